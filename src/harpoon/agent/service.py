"""The agent's ttrpc service: each RPC of harpoon.agent.v1.Agent, mapped onto the
process table and the guest's filesystems."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator

from google.protobuf import empty_pb2, timestamp_pb2

from harpoon import __version__, linux
from harpoon.agent import cgroups, processes, rootfs
from harpoon.agent.processes import ProcessSpec, ProcessTable
from harpoon.api.agent.v1 import agent_pb2
from harpoon.errdefs import InvalidArgument
from harpoon.ttrpc.server import CallContext

STREAM_NAMES = {agent_pb2.STDOUT: "stdout", agent_pb2.STDERR: "stderr"}
_EMPTY = empty_pb2.Empty()
OUTPUT_DRAIN_WAIT_S = 2.0
RNDRESEEDCRNG = 0x5207  # linux/random.h: _IO('R', 0x07)


def _rlim(value: int) -> int:
    # OCI writes "unlimited" as the all-ones uint64; setrlimit wants RLIM_INFINITY (-1).
    return -1 if value >= (1 << 64) - 1 else value


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class AgentService:
    def __init__(self, table: ProcessTable, started_monotonic: float) -> None:
        self.table = table
        self.started_monotonic = started_monotonic

    async def Hello(
        self, request: agent_pb2.HelloRequest, ctx: CallContext
    ) -> agent_pb2.HelloResponse:
        if request.entropy:
            with contextlib.suppress(OSError), open("/dev/urandom", "wb") as pool:
                pool.write(request.entropy)
                pool.flush()
                # Mixing in is not enough on Linux 6.1: VMs restored from one template
                # would go on drawing the same bytes until the next scheduled reseed.
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
        spec = ProcessSpec(
            args=list(request.args),
            env=list(request.env),
            cwd=request.cwd or "/",
            root=request.root,
            uid=request.uid,
            gid=request.gid,
            additional_gids=list(request.additional_gids),
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            terminal=request.terminal,
            container_init=request.container_init,
            rlimits=[
                (processes.rlimit_number(r.type), _rlim(r.soft), _rlim(r.hard))
                for r in request.rlimits
            ],
            no_new_privileges=request.no_new_privileges,
        )
        if request.root:
            rootfs.prepare_root(request.root)
            cgroups.ensure_container_group()
        if request.hostname:
            linux.sethostname(request.hostname)
        self.table.create(request.id, spec)
        return _EMPTY

    async def StartProcess(
        self, request: agent_pb2.StartProcessRequest, ctx: CallContext
    ) -> agent_pb2.StartProcessResponse:
        process = self.table.get(request.id)
        return agent_pb2.StartProcessResponse(pid=self.table.start(process))

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
        self.table.delete(self.table.get(request.id))
        return _EMPTY

    async def ReadOutput(
        self, request: agent_pb2.ReadOutputRequest, ctx: CallContext
    ) -> AsyncIterator[agent_pb2.OutputChunk]:
        process = self.table.get(request.id)
        stream = STREAM_NAMES[request.stream]
        while (chunk := await processes.read_output(process, stream)) is not None:
            yield agent_pb2.OutputChunk(data=chunk)

    async def WriteStdin(
        self, requests: AsyncIterator[agent_pb2.StdinChunk], ctx: CallContext
    ) -> empty_pb2.Empty:
        process = None
        async for chunk in requests:
            if process is None:
                process = self.table.get(chunk.id)
            if chunk.data:
                await processes.write_input(process, chunk.data)
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

    async def Shutdown(self, request: empty_pb2.Empty, ctx: CallContext) -> empty_pb2.Empty:
        asyncio.get_running_loop().call_later(0.05, power_off)
        return _EMPTY


def power_off() -> None:
    os.sync()
    linux.reboot_power_off()
