"""The ttrpc server seen from the raw wire: the exact frames it sends, and how it faces a
peer that breaks the protocol (it answers what can be answered, drops the connection when
framing is lost, and keeps serving everyone else)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from harpoon.api.ttrpc import request_pb2
from harpoon.ttrpc.codec import (
    MAX_MESSAGE_BYTES,
    Flags,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
)
from harpoon.ttrpc.server import CallContext, Server
from harpoon.ttrpc.status import Code

pytestmark = pytest.mark.timeout(30)

SVC = "test.v1.Things"


class RawPeer:
    """A client that writes whatever bytes it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(
        self,
        stream_id: int,
        method: str = "Echo",
        payload: bytes = b"hi",
        flags: Flags = Flags.NONE,
        metadata: Sequence[request_pb2.KeyValue] = (),
    ) -> None:
        request = request_pb2.Request(
            service=SVC, method=method, payload=payload, metadata=metadata
        )
        await self.send(
            encode_frame(Frame(stream_id, MessageType.REQUEST, flags, request.SerializeToString()))
        )

    async def frame(self) -> Frame:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(1 << 16), 2)
            assert data, "server closed the connection instead of answering"
            for event in self.decoder.feed(data):
                assert isinstance(event, Frame)
                self.frames.append(event)
        return self.frames.pop(0)

    async def response(self) -> tuple[int, request_pb2.Response]:
        frame = await self.frame()
        assert (frame.type, frame.flags) == (MessageType.RESPONSE, Flags.NONE)
        return frame.stream_id, request_pb2.Response.FromString(frame.payload)

    async def expect_error(self, stream_id: int, code: Code, message: str | None = None) -> None:
        sid, response = await self.response()
        assert (sid, response.status.code) == (stream_id, code)
        if message is not None:
            assert response.status.message == message

    async def expect_echo(self, stream_id: int, payload: bytes = b"hi") -> None:
        sid, response = await self.response()
        assert (sid, response.HasField("status"), response.payload) == (stream_id, False, payload)

    async def expect_closed(self) -> None:
        while data := await asyncio.wait_for(self.reader.read(1 << 16), 2):
            assert all(isinstance(e, Frame) for e in self.decoder.feed(data))


def hostile_test(
    body: Callable[[Server, Callable[[], Awaitable[RawPeer]]], Awaitable[None]],
) -> Callable[[Path], None]:
    """Runs ``body`` against a server listening on a unix socket, then checks that the
    server still answers a well-behaved newcomer."""

    def test(tmp_path: Path) -> None:
        async def main() -> None:
            path = str(tmp_path / "s.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen()
            server = Server()

            async def echo(payload: bytes, ctx: CallContext) -> bytes:
                return payload

            server.register_unary(SVC, "Echo", echo)
            serving = asyncio.create_task(server.serve(listener))

            async def connect() -> RawPeer:
                return RawPeer(*await asyncio.open_unix_connection(path))

            await body(server, connect)
            newcomer = await connect()
            await newcomer.request(1)
            await newcomer.expect_echo(1)
            await server.close()
            await asyncio.wait_for(serving, 2)

        asyncio.run(asyncio.wait_for(main(), 20))

    return test


@hostile_test
async def test_server_stream_ends_with_a_no_data_close(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    async def two(payload: bytes, ctx: CallContext) -> AsyncIterator[bytes]:
        yield b"1"
        yield b""

    server.register_server_stream(SVC, "Two", two)
    peer = await connect()
    await peer.request(1, "Two", flags=Flags.REMOTE_CLOSED)
    assert await peer.frame() == Frame(1, MessageType.DATA, Flags.NONE, b"1")
    assert await peer.frame() == Frame(1, MessageType.DATA, Flags.NONE, b"")
    end = await peer.frame()
    assert end == Frame(1, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")


@hostile_test
async def test_metadata_keys_reach_handlers_lowercased(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    async def show(payload: bytes, ctx: CallContext) -> bytes:
        return repr(sorted(ctx.metadata.items())).encode()

    server.register_unary(SVC, "Show", show)
    peer = await connect()
    metadata = [
        request_pb2.KeyValue(key="Containerd-Namespace-Ttrpc", value="k8s.io"),
        request_pb2.KeyValue(key="x-multi", value="a"),
        request_pb2.KeyValue(key="X-Multi", value="b"),
    ]
    await peer.request(1, "Show", metadata=metadata)
    expected = [("containerd-namespace-ttrpc", ["k8s.io"]), ("x-multi", ["a", "b"])]
    await peer.expect_echo(1, repr(expected).encode())


@hostile_test
async def test_even_stream_id_is_invalid_and_the_connection_goes_on(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    await peer.request(2)
    await peer.expect_error(
        2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
    )
    await peer.request(3)
    await peer.expect_echo(3)


@hostile_test
async def test_reused_stream_id_is_invalid(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    await peer.request(5)
    await peer.expect_echo(5)
    for stale in (5, 3):
        await peer.request(stale)
        await peer.expect_error(
            stale, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
        )
    await peer.request(7)
    await peer.expect_echo(7)


@hostile_test
async def test_oversized_request_is_resource_exhausted(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    length = MAX_MESSAGE_BYTES + 1
    await peer.send(struct.pack(">IIBB", length, 1, MessageType.REQUEST, 0) + bytes(length))
    await peer.expect_error(1, Code.RESOURCE_EXHAUSTED)
    await peer.request(3)
    await peer.expect_echo(3)


@hostile_test
async def test_undecodable_request_is_invalid(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    await peer.send(encode_frame(Frame(1, MessageType.REQUEST, Flags.NONE, b"\xff\xfe\xfd")))
    await peer.expect_error(1, Code.INVALID_ARGUMENT)
    await peer.request(3)
    await peer.expect_echo(3)


@hostile_test
async def test_data_for_a_stream_never_opened_is_invalid(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    await peer.send(encode_frame(Frame(9, MessageType.DATA, Flags.NONE, b"stray")))
    await peer.expect_error(9, Code.INVALID_ARGUMENT, "StreamID is no longer active")


@hostile_test
async def test_unknown_frame_types_are_ignored(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    await peer.send(encode_frame(Frame(1, 0x09, Flags.NONE, b"from the future")))
    await peer.request(1)
    await peer.expect_echo(1)


@hostile_test
async def test_garbage_bytes_close_the_connection(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    bystander = await connect()
    await peer.send(b"GET / HTTP/1.1\r\nHost: shim\r\n\r\n")
    await peer.expect_closed()
    await bystander.request(1)
    await bystander.expect_echo(1)


@hostile_test
async def test_truncated_frame_then_close_is_survived(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await connect()
    request = request_pb2.Request(service=SVC, method="Echo", payload=b"x" * 100)
    frame = encode_frame(Frame(1, MessageType.REQUEST, Flags.NONE, request.SerializeToString()))
    await peer.send(frame[:40])
    peer.writer.write_eof()
    await peer.expect_closed()


@hostile_test
async def test_close_message_carrying_data_is_invalid(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def collect(messages: AsyncIterator[bytes], ctx: CallContext) -> bytes:
        started.set()
        try:
            return b"".join([m async for m in messages])
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server.register_client_stream(SVC, "Collect", collect)
    peer = await connect()
    await peer.request(1, "Collect", payload=b"", flags=Flags.REMOTE_OPEN)
    await started.wait()
    await peer.send(encode_frame(Frame(1, MessageType.DATA, Flags.REMOTE_CLOSED, b"data")))
    await peer.expect_error(1, Code.INVALID_ARGUMENT, "data close message cannot include data")
    await asyncio.wait_for(cancelled.wait(), 2)


@hostile_test
async def test_stream_whose_handler_stops_reading_is_dropped(
    server: Server, connect: Callable[[], Awaitable[RawPeer]]
) -> None:
    server.stream_full_timeout_s = 0.2

    async def ignore(messages: AsyncIterator[bytes], ctx: CallContext) -> bytes:
        await asyncio.Event().wait()  # for ever: it never reads its stream
        return b""

    server.register_client_stream(SVC, "Ignore", ignore)
    peer = await connect()
    await peer.request(1, "Ignore", payload=b"", flags=Flags.REMOTE_OPEN)
    chunk = encode_frame(Frame(1, MessageType.DATA, Flags.NONE, bytes(1 << 20)))
    for _ in range(8):
        peer.writer.write(chunk)
    await peer.expect_error(1, Code.RESOURCE_EXHAUSTED)
    await peer.request(3)
    await peer.expect_echo(3)
