"""The protobuf-typed layer: services served from plain async methods, called with
messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from google.protobuf import empty_pb2

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.task.v2 import shim_pb2
from harpoon.ttrpc import CallContext, Code, Server, ServiceClient, TtrpcError, register_service
from harpoon.ttrpc.testing import connected_client

pytestmark = pytest.mark.timeout(30)

TASK = shim_pb2.DESCRIPTOR.services_by_name["Task"]
AGENT = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
TASK_V2 = "containerd.task.v2.Task"
TASK_V3 = "containerd.task.v3.Task"


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=20))


class PartialTask:
    """Implements two Task RPCs; the rest must answer UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.services: list[str] = []

    async def Connect(
        self, request: shim_pb2.ConnectRequest, ctx: CallContext
    ) -> shim_pb2.ConnectResponse:
        self.services.append(ctx.service)
        return shim_pb2.ConnectResponse(shim_pid=42, task_pid=7, version=request.id)

    async def State(self, request: shim_pb2.StateRequest, ctx: CallContext) -> empty_pb2.Empty:
        if request.id == "missing":
            raise TtrpcError(Code.NOT_FOUND, f"container {request.id} not created")
        return empty_pb2.Empty()  # the wrong type: State answers StateResponse


def task_server() -> tuple[Server, PartialTask]:
    server = Server()
    impl = PartialTask()
    register_service(server, TASK, impl, names=[TASK_V2, TASK_V3])
    return server, impl


def test_one_implementation_serves_task_v2_and_v3() -> None:
    async def body() -> None:
        server, impl = task_server()
        async with connected_client(server) as client:
            for name in (TASK_V2, TASK_V3):
                response = await ServiceClient(client, name).call(
                    "Connect", shim_pb2.ConnectRequest(id=name), shim_pb2.ConnectResponse
                )
                assert response == shim_pb2.ConnectResponse(shim_pid=42, task_pid=7, version=name)
        assert impl.services == [TASK_V2, TASK_V3]

    run(body)


def test_default_name_is_the_descriptor_full_name() -> None:
    async def body() -> None:
        server = Server()
        register_service(server, TASK, PartialTask())
        async with connected_client(server) as client:
            response = await ServiceClient(client, TASK_V2).call(
                "Connect", shim_pb2.ConnectRequest(id="x"), shim_pb2.ConnectResponse
            )
            assert response.shim_pid == 42
            with pytest.raises(TtrpcError) as raised:
                await ServiceClient(client, TASK_V3).call(
                    "Connect", shim_pb2.ConnectRequest(), shim_pb2.ConnectResponse
                )
            assert raised.value.code == Code.UNIMPLEMENTED

    run(body)


def test_rpc_missing_from_the_implementation_is_unimplemented() -> None:
    async def body() -> None:
        server, _ = task_server()
        async with connected_client(server) as client:
            with pytest.raises(TtrpcError) as raised:
                await ServiceClient(client, TASK_V3).call(
                    "Pids", shim_pb2.PidsRequest(id="c"), shim_pb2.PidsResponse
                )
        assert raised.value.code == Code.UNIMPLEMENTED
        assert raised.value.message == f"{TASK_V3}.Pids is not implemented by PartialTask"

    run(body)


def test_implementation_errors_and_wrong_return_types_become_statuses() -> None:
    async def body() -> None:
        server, _ = task_server()
        async with connected_client(server) as client:
            task = ServiceClient(client, TASK_V2)
            with pytest.raises(TtrpcError) as raised:
                await task.call(
                    "State", shim_pb2.StateRequest(id="missing"), shim_pb2.StateResponse
                )
            assert (raised.value.code, raised.value.message) == (
                Code.NOT_FOUND,
                "container missing not created",
            )
            with pytest.raises(TtrpcError) as raised:
                await task.call("State", shim_pb2.StateRequest(id="c"), shim_pb2.StateResponse)
            assert raised.value.code == Code.INTERNAL
            assert "expected containerd.task.v2.StateResponse" in raised.value.message

    run(body)


def test_undecodable_payload_is_internal_error_unmarshalling_payload() -> None:
    async def body() -> None:
        server, _ = task_server()
        async with connected_client(server) as client:
            with pytest.raises(TtrpcError) as raised:
                await client.call(TASK_V2, "Connect", b"\x0a\xff")  # field 1, bad length
        assert raised.value.code == Code.INTERNAL
        assert "error unmarshalling payload" in raised.value.message

    run(body)


class StreamingAgent:
    def __init__(self) -> None:
        self.stdin: list[agent_pb2.StdinChunk] = []

    async def ReadOutput(
        self, request: agent_pb2.ReadOutputRequest, ctx: CallContext
    ) -> AsyncIterator[agent_pb2.OutputChunk]:
        for i in range(3):
            yield agent_pb2.OutputChunk(data=f"{request.id}:{request.stream}:{i}".encode())

    async def WriteStdin(
        self, requests: AsyncIterator[agent_pb2.StdinChunk], ctx: CallContext
    ) -> empty_pb2.Empty:
        self.stdin.extend([chunk async for chunk in requests])
        return empty_pb2.Empty()


def test_streaming_rpcs_through_the_typed_layer() -> None:
    async def body() -> None:
        server = Server()
        impl = StreamingAgent()
        register_service(server, AGENT, impl)
        async with connected_client(server) as client:
            agent = ServiceClient(client, AGENT.full_name)
            request = agent_pb2.ReadOutputRequest(id="p1", stream=agent_pb2.STDERR)
            chunks = [
                c.data async for c in agent.stream("ReadOutput", request, agent_pb2.OutputChunk)
            ]
            assert chunks == [b"p1:1:0", b"p1:1:1", b"p1:1:2"]

            async def stdin() -> AsyncIterator[agent_pb2.StdinChunk]:
                yield agent_pb2.StdinChunk(id="p1", data=b"hello ")
                yield agent_pb2.StdinChunk(data=b"world")

            answer = await agent.call_client_stream("WriteStdin", stdin(), empty_pb2.Empty)
            assert answer == empty_pb2.Empty()
            with pytest.raises(TtrpcError) as raised:
                await agent.call("Hello", agent_pb2.HelloRequest(), agent_pb2.HelloResponse)
            assert raised.value.code == Code.UNIMPLEMENTED
        assert [(c.id, c.data) for c in impl.stdin] == [("p1", b"hello "), ("", b"world")]

    run(body)
