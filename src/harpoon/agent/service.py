"""The agent's ttrpc service: each RPC of harpoon.agent.v1.Agent, mapped onto the
process table and the guest's filesystems."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import time
from collections.abc import AsyncIterator

from google.protobuf import empty_pb2, timestamp_pb2

from harpoon import __version__, linux
from harpoon.agent import cgroups, oci, processes, rootfs, warm_up
from harpoon.agent.container import Container, OciProcess
from harpoon.agent.processes import ProcessSpec, ProcessTable
from harpoon.api.agent.v1 import agent_pb2
from harpoon.errdefs import FailedPrecondition, InvalidArgument
from harpoon.ttrpc.codec import Parts
from harpoon.ttrpc.server import CallContext
from harpoon.ttrpc.service import raw_messages

STREAM_NAMES = {agent_pb2.STDOUT: "stdout", agent_pb2.STDERR: "stderr"}
_EMPTY = empty_pb2.Empty()
# OutputChunk's one field, `bytes data`, starts with this tag: field number, wire type 2.
_OUTPUT_DATA_TAG = agent_pb2.OutputChunk.DESCRIPTOR.fields_by_name["data"].number << 3 | 2


def output_chunk(data: bytes) -> Parts:
    """OutputChunk(data=data) in its wire form, as pieces: the field's tag and length
    (a varint), then data itself, not copied into a message and again into its
    serialization (see ttrpc.codec.Parts: a MiB of output is ~10 ms less of the guest's
    CPU). tests/unit/test_agent_output_chunk.py holds it to protobuf's own encoding."""
    if not data:
        return Parts()  # proto3 leaves an empty field out
    prefix = bytearray((_OUTPUT_DATA_TAG,))
    length = len(data)
    while length >= 0x80:
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return Parts(bytes(prefix), data)


_STDIN_ID_FIELD = agent_pb2.StdinChunk.DESCRIPTOR.fields_by_name["id"].number
_STDIN_DATA_FIELD = agent_pb2.StdinChunk.DESCRIPTOR.fields_by_name["data"].number
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10


_MAX_KEY = 0xFFFF_FFFF


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The varint at view[pos:], and the position after it."""
    value = shift = 0
    for index in range(pos, min(pos + _MAX_VARINT_BYTES, len(view))):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise InvalidArgument("StdinChunk: truncated or overlong varint")


def stdin_chunk(payload: bytes | memoryview) -> tuple[str, memoryview]:
    """StdinChunk's id and data as protobuf would parse them from payload, the data a
    view of payload, not a copy (see output_chunk; test_agent_stdin_chunk.py holds it
    to protobuf's parse). InvalidArgument if payload is not a StdinChunk."""
    view = memoryview(payload).cast("B")
    end = len(view)
    process_id: str = ""
    data = view[0:0]
    pos = 0
    while pos < end:
        key, pos = _varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0 or key > _MAX_KEY:  # a key is a uint32, as protobuf reads it
            raise InvalidArgument(f"StdinChunk: bad field number {field}")
        if wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(view, pos)
            if length > end - pos:
                raise InvalidArgument("StdinChunk: a field runs past the message's end")
            value = view[pos : pos + length]
            pos += length
            if field == _STDIN_DATA_FIELD:
                data = value
            elif field == _STDIN_ID_FIELD:
                try:
                    process_id = str(value, "utf-8")
                except UnicodeDecodeError:
                    raise InvalidArgument("StdinChunk: id is not UTF-8") from None
        else:
            pos = _skip_scalar(view, pos, wire_type)
    return process_id, data


def _skip_scalar(view: memoryview, pos: int, wire_type: int) -> int:
    """The position after a field that is not length-delimited (one StdinChunk does
    not have: protobuf keeps it as unknown)."""
    if wire_type == _VARINT:
        return _varint(view, pos)[1]
    if wire_type in (_FIXED64, _FIXED32):
        pos += 8 if wire_type == _FIXED64 else 4
        if pos > len(view):
            raise InvalidArgument("StdinChunk: a fixed-size field runs past the end")
        return pos
    # Groups: no field of StdinChunk, nor anything a harpoon host sends.
    raise InvalidArgument(f"StdinChunk: unexpected wire type {wire_type}")


# WaitDeviceRequest.Kind -> harpoon.agent.devices' kinds (by name: devices is lazy).
_DEVICE_KINDS = {
    agent_pb2.WaitDeviceRequest.BLOCK: "block",
    agent_pb2.WaitDeviceRequest.VIRTIO_PORT: "virtio-port",
    agent_pb2.WaitDeviceRequest.NIC: "nic",
}
OUTPUT_DRAIN_WAIT_S = 2.0
RNDADDENTROPY = 0x40085203  # linux/random.h: _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # linux/random.h: _IO('R', 0x07)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _check_executable(spec: ProcessSpec) -> None:
    """runc's own check and words, before crun's (which differ) can be reached."""
    process, container = spec.process, spec.container
    mounted = container.bind_destinations()
    if (
        processes.find_executable(
            process.args[0], process.env, process.cwd, container.root, mounted
        )
        is None
    ):
        raise processes.executable_not_found(process.args[0])


class AgentService:
    def __init__(self, table: ProcessTable, started_monotonic: float) -> None:
        self.table = table
        self.runtime = oci.OciRuntime(table)
        self.started_monotonic = started_monotonic
        self._warm_up_command = warm_up.prepare(self.runtime)
        self._warm_up: asyncio.Future[None] | None = None

    async def Hello(
        self, request: agent_pb2.HelloRequest, ctx: CallContext
    ) -> agent_pb2.HelloResponse:
        if request.warm_up and self._warm_up_command and self._warm_up is None:
            # Runs once this answer is sent (harpoon.agent.warm_up).
            self._warm_up = asyncio.ensure_future(warm_up.run(self.runtime, self._warm_up_command))
        if request.entropy:
            with contextlib.suppress(OSError), open("/dev/urandom", "wb") as pool:
                # Credited, not only mixed in: nothing reads randomness during boot (the
                # kernel command line sets PYTHONHASHSEED), and the first getrandom() of
                # an unseeded Linux 6.1 guest spins ~1 s in the jitter-entropy loop
                # under TCG.
                data = request.entropy
                fcntl.ioctl(pool, RNDADDENTROPY, struct.pack("ii", 8 * len(data), len(data)) + data)
                # And reseeded: VMs restored from one template would otherwise go on
                # drawing the same bytes until the next scheduled reseed.
                fcntl.ioctl(pool, RNDRESEEDCRNG)
        if request.HasField("host_time"):
            # The guest clock stands still while a VM is saved; the host's is right.
            with contextlib.suppress(OSError):
                time.clock_settime(time.CLOCK_REALTIME, request.host_time.ToNanoseconds() / 1e9)
        return agent_pb2.HelloResponse(
            agent_version=__version__,
            kernel_release=os.uname().release,
            agent_uptime_s=time.monotonic() - self.started_monotonic,
        )

    async def Mount(self, request: agent_pb2.MountRequest, ctx: CallContext) -> empty_pb2.Empty:
        rootfs.mount_filesystem(
            request.source, request.target, request.fstype, list(request.options)
        )
        return _EMPTY

    async def Unmount(self, request: agent_pb2.UnmountRequest, ctx: CallContext) -> empty_pb2.Empty:
        linux.unmount_all(request.target)
        return _EMPTY

    async def CreateProcess(
        self, request: agent_pb2.CreateProcessRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        """A container's init is created by crun here (as `runc create` would be at
        Create); an exec only gets its pipes until it starts (as under runc, an exec of
        a missing executable is accepted and fails at its start)."""
        if not request.oci_json:
            raise InvalidArgument(
                f"process {request.id!r} has no OCI spec (oci_json): the agent runs only "
                "container processes, under crun"
            )
        if request.container_init:
            container, process = Container.parse(request.oci_json), None
        else:
            container = self.table.get(request.container_id).spec.container
            process = OciProcess.parse(request.oci_json)
        spec = ProcessSpec(
            container,
            process,
            container_id=request.container_id,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            terminal=request.terminal,
        )
        if not spec.process.args:
            raise InvalidArgument(f"process {request.id!r} has no args to run")
        if spec.container_init:
            _check_executable(spec)
        if request.hostname:
            linux.sethostname(request.hostname)
        created = self.table.create(request.id, spec)
        if spec.container_init:
            try:
                await self.runtime.create(created)
            except BaseException:
                self.table.delete(created)
                raise
        return _EMPTY

    async def StartProcess(
        self, request: agent_pb2.StartProcessRequest, ctx: CallContext
    ) -> agent_pb2.StartProcessResponse:
        process = self.table.get(request.id)
        if process.started:
            raise FailedPrecondition(f"process {process.id!r} has already been started")
        if process.spec.container_init:
            pid = await self.runtime.start(process)
        else:
            _check_executable(process.spec)
            pid = await self.runtime.exec(process)
        return agent_pb2.StartProcessResponse(pid=pid)

    async def WaitProcess(
        self, request: agent_pb2.WaitProcessRequest, ctx: CallContext
    ) -> agent_pb2.WaitProcessResponse:
        process = self.table.get(request.id)
        await process.exited.wait()
        # Normally the output is all sent before the exit is: but a host that does not
        # read it (a client gone) must not keep the exit from being reported.
        drained = [asyncio.ensure_future(event.wait()) for event in process.drained.values()]
        _, pending = await asyncio.wait(drained, timeout=OUTPUT_DRAIN_WAIT_S)
        for waiting in pending:
            waiting.cancel()
        assert process.exit_status is not None
        return agent_pb2.WaitProcessResponse(
            exit_status=process.exit_status,
            exited_at=_timestamp(process.exited_at),
            oom_killed=process.oom_killed,
        )

    async def SignalProcess(
        self, request: agent_pb2.SignalProcessRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        self.table.signal(self.table.get(request.id), request.signal, request.all)
        return _EMPTY

    async def DeleteProcess(
        self, request: agent_pb2.DeleteProcessRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        process = self.table.get(request.id)
        self.table.check_deletable(process)
        if process.spec.container_init:
            await self.runtime.delete(process.id)
        self.table.delete(process)
        return _EMPTY

    async def ReadOutput(
        self, request: agent_pb2.ReadOutputRequest, ctx: CallContext
    ) -> AsyncIterator[Parts]:
        process = self.table.get(request.id)
        stream = STREAM_NAMES[request.stream]
        while (chunk := await processes.read_output(process, stream)) is not None:
            yield output_chunk(chunk)

    @raw_messages
    async def WriteStdin(self, requests: AsyncIterator[bytes], ctx: CallContext) -> empty_pb2.Empty:
        """StdinChunks, decoded by hand: their data goes to the process's stdin as views
        of the messages received."""
        process = None
        async for payload in requests:
            process_id, data = stdin_chunk(payload)
            if process is None:
                process = self.table.get(process_id)
            if data:
                await processes.write_input(process, data)
        return _EMPTY

    async def CloseStdin(
        self, request: agent_pb2.CloseStdinRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        processes.close_input(self.table.get(request.id))
        return _EMPTY

    async def Stats(self, request: empty_pb2.Empty, ctx: CallContext) -> agent_pb2.StatsResponse:
        return agent_pb2.StatsResponse(metrics=cgroups.read_metrics())

    async def UpdateResources(
        self, request: agent_pb2.UpdateResourcesRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        cgroups.ensure_container_group()
        try:
            cgroups.set_limits(
                request.memory_limit_bytes,
                request.cpu_quota_us,
                request.cpu_period_us,
                request.pids_limit,
            )
        except OSError as error:
            raise InvalidArgument(f"cannot set the container's limits: {error}") from None
        return _EMPTY

    async def ResizeTerminal(
        self, request: agent_pb2.ResizeTerminalRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        processes.resize_terminal(self.table.get(request.id), request.width, request.height)
        return _EMPTY

    async def WaitDevice(
        self, request: agent_pb2.WaitDeviceRequest, ctx: CallContext
    ) -> agent_pb2.WaitDeviceResponse:
        from harpoon.agent import devices  # lazily: most VMs never wait for a device

        kind = _DEVICE_KINDS.get(request.kind)
        if kind is None:
            raise InvalidArgument(f"WaitDevice needs a device kind, not {request.kind}")
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else devices.DEFAULT_TIMEOUT_S
        path = await devices.wait_for_device(kind, request.id, timeout_s)
        return agent_pb2.WaitDeviceResponse(path=path)

    async def ConfigureNetwork(
        self, request: agent_pb2.ConfigureNetworkRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        from harpoon.agent import network  # lazily: most VMs have no network to configure

        await network.configure(self.table, request)
        return _EMPTY

    async def ListeningPorts(
        self, request: empty_pb2.Empty, ctx: CallContext
    ) -> agent_pb2.ListeningPortsResponse:
        from harpoon.agent import network

        ports = sorted(network.listening_ports())
        return agent_pb2.ListeningPortsResponse(
            ports=[agent_pb2.ListeningPort(protocol=p, port=n) for p, n in ports]
        )

    async def ListProcesses(
        self, request: empty_pb2.Empty, ctx: CallContext
    ) -> agent_pb2.ListProcessesResponse:
        from harpoon.agent import ps

        return ps.list_processes()

    async def SetHostPorts(
        self, request: agent_pb2.SetHostPortsRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        from harpoon.agent import network

        await network.set_host_ports(request)
        return _EMPTY

    async def Shutdown(self, request: empty_pb2.Empty, ctx: CallContext) -> empty_pb2.Empty:
        # The host waits for this answer: the guest goes only once it has been sent.
        ctx.after_reply(power_off)
        return _EMPTY


def power_off() -> None:
    os.sync()
    linux.reboot_power_off()
