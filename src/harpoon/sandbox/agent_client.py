"""The host's typed client for the guest agent's ttrpc service.

Connecting depends on the VMM (VirtualMachine.agent_waits_for_guest): QEMU's sockets
hold a connection until the guest opens its ports, so `connect` connects both at once
and Hello waits in the channel; vfkit's close a connection made before the guest's
agent listens on its vsock port, so `connect_when_listening` connects and says Hello
again after each such EOF until the agent answers, and connects the stdio socket then
(the agent listens on both before it answers: harpoon.agent.main).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.names import AGENT_SERVICE
from harpoon.sandbox.ports import Port, connect_port, connect_ports
from harpoon.ttrpc.client import Client
from harpoon.ttrpc.status import Code, ConnectionClosedError, TtrpcError

ResponseT = TypeVar("ResponseT", bound=Message)
CONTROL_TIMEOUT_S = 30.0
HELLO_ENTROPY_BYTES = 64
#: Between a connection the VMM closed (the guest did not listen yet) and the next.
RECONNECT_PAUSE_S = 0.02
#: How long one connection may leave Hello unanswered before another is tried: a guard
#: against a VMM whose dial to the guest waits instead of failing (Virtualization.
#: framework's connectToPort is not documented to fail fast); a listening agent answers
#: in well under it, and Hello may be said twice (harpoon.agent.service).
ATTEMPT_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


class AgentClient:
    """Control calls on the agent port; process output and input on the stdio port
    (the same connection when there is no stdio port)."""

    def __init__(self, client: Client, stdio: Client | None = None) -> None:
        self._client = client
        self._stdio = stdio or client
        self.process_started = asyncio.Event()
        """Set once a process has started in the guest (the container is running)."""

    @classmethod
    async def connect(cls, socket_path: str, stdio_path: str | None = None) -> AgentClient:
        return cls.over(*await connect_ports(socket_path, stdio_path))

    @classmethod
    async def connect_when_listening(
        cls, socket_path: str, stdio_path: str, timeout: float, warm_up: bool = False
    ) -> tuple[AgentClient, agent_pb2.HelloResponse]:
        """A client whose Hello the agent answered, for a VMM that closes connections
        made before the guest listens (vfkit): connects to socket_path and says Hello,
        again after each connection the VMM closed unanswered (or left unanswered for
        ATTEMPT_TIMEOUT_S), until the agent answers or `timeout` has passed (then the
        last attempt's error: ConnectionClosedError, or DEADLINE_EXCEEDED); then
        connects stdio_path. The caller bounds it by the VMM's life too (a dead VMM's
        socket refuses connections: ConnectionRefusedError)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempts = 0
        while True:
            attempts += 1
            client = cls(_client(await connect_port(socket_path)))
            try:
                hello = await client.hello(
                    max(0.0, min(deadline - loop.time(), ATTEMPT_TIMEOUT_S)), warm_up
                )
                break
            except TtrpcError as error:
                await client.close()
                if not _unanswered(error) or loop.time() + RECONNECT_PAUSE_S >= deadline:
                    raise
                if error.code == Code.DEADLINE_EXCEEDED:
                    continue  # waited long enough already
            except BaseException:
                await client.close()
                raise
            await asyncio.sleep(RECONNECT_PAUSE_S)
        log.debug("the agent answered Hello on connection %d", attempts)
        try:
            stdio = await connect_port(stdio_path)
        except BaseException:
            await client.close()
            raise
        return cls(client._client, _client(stdio)), hello

    @classmethod
    def over(cls, control: Port, stdio: Port | None = None) -> AgentClient:
        """A client on ports already connected (harpoon.sandbox.ports)."""
        return cls(_client(control), _client(stdio) if stdio is not None else None)

    async def close(self) -> None:
        await self._client.close()
        if self._stdio is not self._client:
            await self._stdio.close()

    async def _call(
        self,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        timeout: float | None = CONTROL_TIMEOUT_S,
    ) -> ResponseT:
        began = time.monotonic()
        payload = await self._client.call(
            AGENT_SERVICE, method, request.SerializeToString(), timeout=timeout
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("agent %s answered in %.1f ms", method, (time.monotonic() - began) * 1e3)
        response = response_type()
        response.ParseFromString(payload)
        return response

    async def hello(self, timeout: float, warm_up: bool = False) -> agent_pb2.HelloResponse:
        """warm_up: the guest is emulated and should rehearse a container's creation on
        a spare vCPU (harpoon.agent.warm_up)."""
        host_time = timestamp_pb2.Timestamp()
        host_time.FromNanoseconds(time.time_ns())
        return await self._call(
            "Hello",
            agent_pb2.HelloRequest(
                host_time=host_time, entropy=os.urandom(HELLO_ENTROPY_BYTES), warm_up=warm_up
            ),
            agent_pb2.HelloResponse,
            timeout,
        )

    async def mount(self, source: str, target: str, fstype: str, options: list[str]) -> None:
        request = agent_pb2.MountRequest(
            source=source, target=target, fstype=fstype, options=options
        )
        await self._call("Mount", request, empty_pb2.Empty)

    async def unmount(self, target: str) -> None:
        await self._call("Unmount", agent_pb2.UnmountRequest(target=target), empty_pb2.Empty)

    async def create_process(self, request: agent_pb2.CreateProcessRequest) -> None:
        await self._call("CreateProcess", request, empty_pb2.Empty)

    async def start_process(self, process_id: str) -> int:
        request = agent_pb2.StartProcessRequest(id=process_id)
        response = await self._call("StartProcess", request, agent_pb2.StartProcessResponse)
        self.process_started.set()
        return response.pid

    async def wait_process(self, process_id: str) -> agent_pb2.WaitProcessResponse:
        request = agent_pb2.WaitProcessRequest(id=process_id)
        return await self._call("WaitProcess", request, agent_pb2.WaitProcessResponse, None)

    async def signal_process(
        self, process_id: str, signal: int, all_processes: bool, timeout: float = CONTROL_TIMEOUT_S
    ) -> None:
        request = agent_pb2.SignalProcessRequest(id=process_id, signal=signal, all=all_processes)
        await self._call("SignalProcess", request, empty_pb2.Empty, timeout)

    async def delete_process(self, process_id: str) -> None:
        await self._call(
            "DeleteProcess", agent_pb2.DeleteProcessRequest(id=process_id), empty_pb2.Empty
        )

    async def read_output(self, process_id: str, stream: agent_pb2.Stream) -> AsyncIterator[bytes]:
        request = agent_pb2.ReadOutputRequest(id=process_id, stream=stream)
        async for payload in self._stdio.stream(
            AGENT_SERVICE, "ReadOutput", request.SerializeToString()
        ):
            chunk = agent_pb2.OutputChunk()
            chunk.ParseFromString(payload)
            yield chunk.data

    async def write_stdin(self, process_id: str, data: AsyncIterable[bytes]) -> None:
        async def messages() -> AsyncIterator[bytes]:
            first = True
            async for block in data:
                chunk = agent_pb2.StdinChunk(id=process_id if first else "", data=block)
                first = False
                yield chunk.SerializeToString()
            if first:
                yield agent_pb2.StdinChunk(id=process_id).SerializeToString()

        await self._stdio.call_client_stream(AGENT_SERVICE, "WriteStdin", messages())

    async def close_stdin(self, process_id: str) -> None:
        await self._call("CloseStdin", agent_pb2.CloseStdinRequest(id=process_id), empty_pb2.Empty)

    async def shutdown(self) -> None:
        await self._call("Shutdown", empty_pb2.Empty(), empty_pb2.Empty, timeout=5.0)

    async def stats(self) -> agent_pb2.StatsResponse:
        return await self._call("Stats", empty_pb2.Empty(), agent_pb2.StatsResponse)

    async def list_processes(self) -> agent_pb2.ListProcessesResponse:
        return await self._call("ListProcesses", empty_pb2.Empty(), agent_pb2.ListProcessesResponse)

    async def update_resources(self, request: agent_pb2.UpdateResourcesRequest) -> None:
        await self._call("UpdateResources", request, empty_pb2.Empty)

    async def wait_device(
        self, kind: agent_pb2.WaitDeviceRequest.Kind, device_id: str, timeout_s: float
    ) -> str:
        """The guest's /dev path of a device (a NIC: its name), found by its id once the
        guest has it; DEADLINE_EXCEEDED if it does not appear within timeout_s."""
        request = agent_pb2.WaitDeviceRequest(
            kind=kind, id=device_id, timeout_ms=max(1, round(timeout_s * 1000))
        )
        # The agent's own timeout ends the wait; the call's leaves it time to say so.
        response = await self._call(
            "WaitDevice", request, agent_pb2.WaitDeviceResponse, timeout_s + CONTROL_TIMEOUT_S
        )
        return response.path

    async def configure_network(self, request: agent_pb2.ConfigureNetworkRequest) -> None:
        # Loads the NIC's driver and waits for the NIC first: more than a control call.
        await self._call("ConfigureNetwork", request, empty_pb2.Empty, 2 * CONTROL_TIMEOUT_S)

    async def listening_ports(self) -> set[tuple[str, int]]:
        response = await self._call(
            "ListeningPorts", empty_pb2.Empty(), agent_pb2.ListeningPortsResponse
        )
        return {(port.protocol, port.port) for port in response.ports}

    async def set_host_ports(self, ports: set[tuple[str, int]]) -> None:
        request = agent_pb2.SetHostPortsRequest(
            ports=[agent_pb2.ListeningPort(protocol=p, port=n) for p, n in sorted(ports)]
        )
        await self._call("SetHostPorts", request, empty_pb2.Empty)

    async def resize_terminal(self, process_id: str, width: int, height: int) -> None:
        request = agent_pb2.ResizeTerminalRequest(id=process_id, width=width, height=height)
        await self._call("ResizeTerminal", request, empty_pb2.Empty)


def _client(port: Port) -> Client:
    # A stdout stream nobody drains (a client that stopped reading its FIFO) stalls
    # its connection rather than dropping output: output is never lost. That is why
    # streams have a connection (and a port) of their own.
    return Client(*port, stream_full_timeout_s=None)


def _unanswered(error: TtrpcError) -> bool:
    """Whether a Hello failed for want of a guest on the other end: the VMM closed the
    connection, or the attempt's time ran out; not an answer of the agent's."""
    return isinstance(error, ConnectionClosedError) or error.code == Code.DEADLINE_EXCEEDED
