"""ttrpc calls between a real Server and Client over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from harpoon.ttrpc import CallContext, Client, Code, ConnectionClosedError, Server, TtrpcError
from harpoon.ttrpc.testing import connected_client

pytestmark = pytest.mark.timeout(30)

SVC = "test.v1.Things"
MiB = 1 << 20


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=20))


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


def echo_server() -> Server:
    server = Server()
    server.register_unary(SVC, "Echo", echo)
    return server


def test_unary_call_over_a_listening_unix_socket(tmp_path: Path) -> None:
    async def body() -> None:
        path = str(tmp_path / "ttrpc.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        server = echo_server()
        serving = asyncio.create_task(server.serve(listener))
        clients = [await Client.connect_unix(path) for _ in range(3)]
        answers = await asyncio.gather(
            *(c.call(SVC, "Echo", f"hello {i}".encode()) for i, c in enumerate(clients))
        )
        assert answers == [b"hello 0", b"hello 1", b"hello 2"]
        assert await clients[0].call(SVC, "Echo", b"") == b""
        await server.close()
        await asyncio.wait_for(serving, 2)  # serve() returns once closed
        for client in clients:
            await asyncio.wait_for(client.wait_closed(), 2)
            assert client.closed

    run(body)


def test_concurrent_calls_are_answered_out_of_order_and_a_blocked_call_holds_up_none() -> None:
    async def body() -> None:
        server = echo_server()
        releases = {i: asyncio.Event() for i in range(50)}
        forever = asyncio.Event()

        async def wait(payload: bytes, ctx: CallContext) -> bytes:
            await releases[int(payload)].wait()
            return payload

        async def block(payload: bytes, ctx: CallContext) -> bytes:
            await forever.wait()
            return b"never"

        server.register_unary(SVC, "Wait", wait)
        server.register_unary(SVC, "Block", block)
        async with connected_client(server) as client:
            blocked = asyncio.create_task(client.call(SVC, "Block", b""))
            calls = [
                asyncio.create_task(client.call(SVC, "Wait", str(i).encode())) for i in range(50)
            ]
            finished: list[int] = []
            for i in reversed(range(50)):
                releases[i].set()
                finished.append(int(await asyncio.wait_for(calls[i], 2)))
                assert not any(c.done() for c in calls[:i])
            assert finished == list(reversed(range(50)))
            assert await client.call(SVC, "Echo", b"still answered") == b"still answered"
            assert not blocked.done()
            blocked.cancel()

    run(body)


class Blocker:
    """A handler that waits forever and records its cancellation."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.contexts: list[CallContext] = []

    async def __call__(self, payload: bytes, ctx: CallContext) -> bytes:
        self.contexts.append(ctx)
        self.started.set()
        try:
            await asyncio.Event().wait()  # for ever
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""


def test_server_deadline_cancels_the_handler_and_answers_deadline_exceeded() -> None:
    async def body() -> None:
        server = Server()
        blocker = Blocker()
        server.register_unary(SVC, "Slow", blocker)
        async with connected_client(server) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TtrpcError) as raised:
                await client.call(SVC, "Slow", b"", timeout=0.2)
            assert raised.value.code == Code.DEADLINE_EXCEEDED
            assert loop.time() - started < 2
            await asyncio.wait_for(blocker.cancelled.wait(), 2)
            deadline = blocker.contexts[0].deadline
            assert deadline is not None and started < deadline < started + 0.5

    run(body)


def test_client_enforces_its_timeout_when_the_server_does_not_answer() -> None:
    async def body() -> None:
        server_sock, client_sock = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=client_sock)
        client = Client(reader, writer)
        with pytest.raises(TtrpcError) as raised:
            await client.call(SVC, "Echo", b"", timeout=0.1)
        assert raised.value.code == Code.DEADLINE_EXCEEDED
        # The connection stays usable for other calls.
        assert not client.closed
        await client.close()
        server_sock.close()

    run(body)


def test_call_without_timeout_has_no_deadline_and_metadata_arrives() -> None:
    async def body() -> None:
        server = Server()
        seen: list[CallContext] = []

        async def record(payload: bytes, ctx: CallContext) -> bytes:
            seen.append(ctx)
            return b""

        server.register_unary(SVC, "Record", record)
        async with connected_client(server) as client:
            metadata = {"containerd-namespace-ttrpc": "default", "X-Trace": "abc"}
            await client.call(SVC, "Record", b"", metadata=metadata)
        [ctx] = seen
        assert (ctx.service, ctx.method, ctx.deadline) == (SVC, "Record", None)
        assert ctx.metadata == {"containerd-namespace-ttrpc": ["default"], "x-trace": ["abc"]}

    run(body)


@pytest.mark.parametrize(
    ("service", "method", "message"),
    [("no.such.Service", "Echo", "service no.such.Service"), (SVC, "Nope", "method Nope")],
)
def test_unknown_service_or_method_is_unimplemented(
    service: str, method: str, message: str
) -> None:
    async def body() -> None:
        async with connected_client(echo_server()) as client:
            with pytest.raises(TtrpcError) as raised:
                await client.call(service, method, b"")
            assert (raised.value.code, raised.value.message) == (Code.UNIMPLEMENTED, message)
            assert await client.call(SVC, "Echo", b"ok") == b"ok"

    run(body)


def test_handler_errors_become_statuses() -> None:
    async def body() -> None:
        server = Server()

        async def not_found(payload: bytes, ctx: CallContext) -> bytes:
            raise TtrpcError(Code.NOT_FOUND, "container not created")

        async def crash(payload: bytes, ctx: CallContext) -> bytes:
            raise ValueError("boom")

        async def too_big(payload: bytes, ctx: CallContext) -> bytes:
            return bytes(5 * MiB)

        server.register_unary(SVC, "NotFound", not_found)
        server.register_unary(SVC, "Crash", crash)
        server.register_unary(SVC, "TooBig", too_big)
        async with connected_client(server) as client:
            for method, code, message in [
                ("NotFound", Code.NOT_FOUND, "container not created"),
                ("Crash", Code.UNKNOWN, "boom"),
            ]:
                with pytest.raises(TtrpcError) as raised:
                    await client.call(SVC, method, b"")
                assert (raised.value.code, raised.value.message) == (code, message)
                assert str(raised.value) == f"{code.name}: {message}"
            with pytest.raises(TtrpcError) as raised:
                await client.call(SVC, "TooBig", b"")
            assert raised.value.code == Code.RESOURCE_EXHAUSTED

    run(body)


def numbered_chunk(index: int, size: int) -> bytes:
    return index.to_bytes(4, "big") * (size // 4)


def test_server_stream_carries_64_mib_in_order_with_bounded_run_ahead() -> None:
    async def body() -> None:
        server = Server()
        produced = 0
        ahead = asyncio.Event()

        async def generate(payload: bytes, ctx: CallContext) -> AsyncIterator[bytes]:
            nonlocal produced
            for i in range(int(payload)):
                produced += 1
                if produced > 2:
                    ahead.set()
                yield numbered_chunk(i, MiB)

        server.register_server_stream(SVC, "Read", generate)
        async with connected_client(server) as client:
            received = 0
            run_ahead = 0
            async for chunk in client.stream(SVC, "Read", b"64"):
                if received == 0:
                    await ahead.wait()
                    # A window for the producer to run further ahead than it may.
                    await asyncio.sleep(0.3)
                assert chunk == numbered_chunk(received, MiB)
                run_ahead = max(run_ahead, produced - received)
                received += 1
            assert received == 64
            # Buffers between the two ends hold a handful of chunks, not the stream.
            assert 1 < run_ahead <= 16

    run(body)


def test_client_stream_carries_64_mib_with_bounded_buffering() -> None:
    async def body() -> None:
        server = Server()
        produced = 0
        run_ahead = 0
        ahead = asyncio.Event()

        async def consume(messages: AsyncIterator[bytes], ctx: CallContext) -> bytes:
            nonlocal run_ahead
            digest = hashlib.sha256()
            await ahead.wait()
            # A window for the producer to run further ahead than it may.
            await asyncio.sleep(0.3)
            count = 0
            async for message in messages:
                count += 1
                run_ahead = max(run_ahead, produced - count)
                digest.update(message)
            return f"{count} {digest.hexdigest()}".encode()

        server.register_client_stream(SVC, "Write", consume)

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal produced
            for i in range(64):
                produced += 1
                if produced > 2:
                    ahead.set()
                yield numbered_chunk(i, MiB)

        expected = hashlib.sha256(b"".join(numbered_chunk(i, MiB) for i in range(64)))
        async with connected_client(server) as client:
            answer = await client.call_client_stream(SVC, "Write", chunks())
        assert answer == f"64 {expected.hexdigest()}".encode()
        assert 1 < run_ahead <= 16

    run(body)


def test_empty_messages_survive_both_stream_directions() -> None:
    async def body() -> None:
        server = Server()

        async def generate(payload: bytes, ctx: CallContext) -> AsyncIterator[bytes]:
            for item in (b"", b"a", b""):
                yield item

        async def count(messages: AsyncIterator[bytes], ctx: CallContext) -> bytes:
            return repr([m async for m in messages]).encode()

        server.register_server_stream(SVC, "Read", generate)
        server.register_client_stream(SVC, "Write", count)

        async def items() -> AsyncIterator[bytes]:
            for item in (b"", b"", b"z"):
                yield item

        async with connected_client(server) as client:
            assert [m async for m in client.stream(SVC, "Read", b"")] == [b"", b"a", b""]
            answer = await client.call_client_stream(SVC, "Write", items())
            assert answer == repr([b"", b"", b"z"]).encode()

    run(body)


def test_server_stream_error_arrives_after_the_messages_sent_before_it() -> None:
    async def body() -> None:
        server = Server()

        async def failing(payload: bytes, ctx: CallContext) -> AsyncIterator[bytes]:
            yield b"one"
            yield b"two"
            raise TtrpcError(Code.DATA_LOSS, "pipe broke")

        server.register_server_stream(SVC, "Read", failing)
        async with connected_client(server) as client:
            received = []
            with pytest.raises(TtrpcError) as raised:
                async for message in client.stream(SVC, "Read", b""):
                    received.append(message)
            assert received == [b"one", b"two"]
            assert (raised.value.code, raised.value.message) == (Code.DATA_LOSS, "pipe broke")

    run(body)


def test_client_stream_stops_sending_when_the_server_answers_early() -> None:
    async def body() -> None:
        server = Server()

        async def first_only(messages: AsyncIterator[bytes], ctx: CallContext) -> bytes:
            async for message in messages:
                return message
            return b"none"

        server.register_client_stream(SVC, "First", first_only)
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            while True:
                sent += 1
                yield b"x%d" % sent
                await asyncio.sleep(0.01)  # a paced sender, to be stopped by the answer

        async with connected_client(server) as client:
            answer = await client.call_client_stream(SVC, "First", endless())
            assert answer == b"x1"
            assert sent < 50
            assert await client.call(SVC, "First", b"") == b"none"

    run(body)


def test_server_stream_timeout_ends_the_stream_with_deadline_exceeded() -> None:
    async def body() -> None:
        server = Server()

        async def trickle(payload: bytes, ctx: CallContext) -> AsyncIterator[bytes]:
            while True:
                yield b"tick"
                await asyncio.sleep(0.05)  # a paced stream, to be cut by the deadline

        server.register_server_stream(SVC, "Trickle", trickle)
        async with connected_client(server) as client:
            ticks = 0
            with pytest.raises(TtrpcError) as raised:
                async for _ in client.stream(SVC, "Trickle", b"", timeout=0.3):
                    ticks += 1
            assert raised.value.code == Code.DEADLINE_EXCEEDED
            assert 1 <= ticks <= 10

    run(body)


def test_connection_loss_fails_every_pending_call_promptly() -> None:
    async def body() -> None:
        server_sock, client_sock = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=client_sock)
        client = Client(reader, writer)
        pending = [asyncio.create_task(client.call(SVC, "Wait", b"")) for _ in range(5)]

        async def read_stream() -> list[bytes]:
            return [m async for m in client.stream(SVC, "Read", b"")]

        streaming = asyncio.create_task(read_stream())
        # A window in which no call may end while the connection lasts.
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in pending)
        server_sock.close()
        loop = asyncio.get_running_loop()
        started = loop.time()
        for task in [*pending, streaming]:
            with pytest.raises(ConnectionClosedError) as raised:
                await asyncio.wait_for(task, 2)
            assert raised.value.code == Code.UNAVAILABLE
        assert loop.time() - started < 1
        await asyncio.wait_for(client.wait_closed(), 1)
        with pytest.raises(ConnectionClosedError):
            await client.call(SVC, "Echo", b"")

    run(body)


@pytest.mark.parametrize("closing", ["client", "server"])
def test_closing_either_end_cancels_handlers_and_fails_pending_calls(closing: str) -> None:
    async def body() -> None:
        server = Server()
        blocker = Blocker()
        server.register_unary(SVC, "Wait", blocker)
        async with connected_client(server) as client:
            call = asyncio.create_task(client.call(SVC, "Wait", b""))
            await blocker.started.wait()
            await asyncio.wait_for((client if closing == "client" else server).close(), 2)
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(call, 2)
            await asyncio.wait_for(blocker.cancelled.wait(), 2)
            assert client.closed

    run(body)


def test_a_call_abandoned_by_its_caller_leaves_the_connection_working() -> None:
    async def body() -> None:
        server = echo_server()
        started, release, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def slow(payload: bytes, ctx: CallContext) -> bytes:
            started.set()
            await release.wait()
            ctx.after_reply(answered.set)
            return b"late answer"

        server.register_unary(SVC, "Slow", slow)
        async with connected_client(server) as client:
            abandoned = asyncio.create_task(client.call(SVC, "Slow", b""))
            await started.wait()
            abandoned.cancel()
            release.set()
            await answered.wait()  # the late answer is on its way, to be dropped
            assert await client.call(SVC, "Echo", b"fine") == b"fine"
            assert abandoned.cancelled()

    run(body)


def test_many_small_calls_in_flight_at_once() -> None:
    async def body() -> None:
        async with connected_client(echo_server()) as client:
            payloads = [b"%d" % i for i in range(2000)]
            answers = await asyncio.gather(*(client.call(SVC, "Echo", p) for p in payloads))
            assert answers == payloads

    run(body)


# -- after_reply: what must come after the answer --------------------------------------


def test_after_reply_runs_once_the_answer_has_left_so_it_may_stop_the_server_at_once() -> None:
    """The callback aborts the server's connection (as an exiting process would: what is
    still buffered is lost) and closes the server. The client gets the whole answer,
    larger than the socket holds: run before the write, or after a mere drain, the
    callback would cut it off."""

    async def body() -> None:
        answer = bytes(range(256)) * (MiB // 256)
        server = Server()
        server_sock, client_sock = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=server_sock)
        # A drain returns at once with the whole answer still buffered: only a wait for
        # the buffer to empty gets it out before the abort.
        writer.transport.set_write_buffer_limits(high=4 * MiB)
        closing: list[asyncio.Task[None]] = []

        def stop_now() -> None:
            writer.transport.abort()
            closing.append(asyncio.create_task(server.close()))

        async def stop(payload: bytes, ctx: CallContext) -> bytes:
            ctx.after_reply(stop_now)
            return answer

        server.register_unary(SVC, "Stop", stop)
        serving = asyncio.create_task(server.serve_connection(reader, writer))
        client_reader, client_writer = await asyncio.open_connection(sock=client_sock)
        client = Client(client_reader, client_writer)
        assert await client.call(SVC, "Stop", b"") == answer
        await asyncio.wait_for(client.wait_closed(), 5)  # and then the server went away
        await asyncio.wait_for(serving, 5)
        await asyncio.gather(*closing)
        await client.close()

    run(body)


def test_after_reply_callbacks_run_in_order_and_one_that_fails_harms_nothing() -> None:
    async def body() -> None:
        ran: list[str] = []
        reported: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _, context: reported.append(context)
        )

        def fail() -> None:
            ran.append("fail")
            raise RuntimeError("callback broke")

        async def answer(payload: bytes, ctx: CallContext) -> bytes:
            ctx.after_reply(lambda: ran.append("first"))
            ctx.after_reply(fail)
            ctx.after_reply(lambda: ran.append("last"))
            return b"answered"

        server = echo_server()
        server.register_unary(SVC, "Answer", answer)
        async with connected_client(server) as client:
            assert await client.call(SVC, "Answer", b"") == b"answered"
            # The callbacks run on the server's side of the connection: an echo after
            # them is answered after them.
            assert await client.call(SVC, "Echo", b"next") == b"next"
            assert ran == ["first", "fail", "last"]
            assert [str(context["exception"]) for context in reported] == ["callback broke"]

    run(body)


def test_after_reply_runs_when_the_answer_can_no_longer_be_sent() -> None:
    async def body() -> None:
        ran = asyncio.Event()
        started = asyncio.Event()

        async def hang(payload: bytes, ctx: CallContext) -> bytes:
            ctx.after_reply(ran.set)
            started.set()
            await asyncio.Event().wait()
            return b"never"

        server = echo_server()
        server.register_unary(SVC, "Hang", hang)
        async with connected_client(server) as client:
            call = asyncio.create_task(client.call(SVC, "Hang", b""))
            await started.wait()
        # The client is gone: the server abandons the call, and its callbacks run.
        await asyncio.wait_for(ran.wait(), 5)
        with pytest.raises(ConnectionClosedError):
            await call

    run(body)
