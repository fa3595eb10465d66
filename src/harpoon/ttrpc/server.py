"""The ttrpc server: accepts connections and runs registered handlers for their calls.

Handlers deal in serialized payloads (``service.register_service`` adds the protobuf
layer). Every call runs in its own task, because some (a task's Wait) last for hours
while the same connection keeps asking other things. The server answers every stream
it can and otherwise closes the connection; it must never let one call, one handler
error or one misbehaving peer stop it from serving the others, and never buffer
without bound on a peer's behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

from harpoon.ttrpc.channel import (
    READ_CHUNK_BYTES,
    STREAM_FULL_TIMEOUT_S,
    ByteSource,
    Channel,
    ChannelClosedError,
    MessageInbox,
)
from harpoon.ttrpc.codec import Payload
from harpoon.ttrpc.protocol import (
    ConnectionBroken,
    DataReceived,
    RequestReceived,
    ServerConnection,
    ServerEvent,
    StreamEnded,
    StreamRejected,
)
from harpoon.ttrpc.status import Code, TtrpcError

# accept() failures that say "not now" (no fds, no memory, peer gave up) rather than
# "this listener is dead"; retried after a pause instead of ending serve().
_TRANSIENT_ACCEPT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EINTR}
)
ACCEPT_RETRY_S = 0.1


class CallContext:
    """What a handler knows about its call. ``metadata`` keys are lowercase, each with
    all the values sent; ``deadline`` is in event-loop time (``loop.time()``)."""

    # A plain class rather than a dataclass, as all of this package's small classes: the
    # guest agent imports it at boot, where generating dataclass methods is slow.
    __slots__ = ("_after_reply", "deadline", "metadata", "method", "service")

    def __init__(
        self, service: str, method: str, metadata: dict[str, list[str]], deadline: float | None
    ) -> None:
        self.service = service
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        self._after_reply: list[Callable[[], object]] = []

    def after_reply(self, callback: Callable[[], object]) -> None:
        """Calls ``callback()`` once this call's answer has left the process (written to
        the connection, none of it still buffered), or can no longer leave it (the
        connection or the server went away first): for what must come after the answer,
        such as exiting. Callbacks run in the order given, on the event loop; an
        exception from one goes to the loop's exception handler."""
        self._after_reply.append(callback)

    def _replied(self) -> None:
        callbacks, self._after_reply = self._after_reply, []
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"after_reply callback of {self.method}", "exception": exc}
                )

    def _values(self) -> tuple[object, ...]:
        return (self.service, self.method, self.metadata, self.deadline)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CallContext):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return (
            f"CallContext(service={self.service!r}, method={self.method!r}, "
            f"metadata={self.metadata!r}, deadline={self.deadline!r})"
        )


UnaryHandler = Callable[[bytes, CallContext], Awaitable[bytes]]
# A stream's messages may come in pieces (codec.Parts), written without being joined.
ServerStreamHandler = Callable[[bytes, CallContext], AsyncIterator[Payload]]
ClientStreamHandler = Callable[[AsyncIterator[bytes], CallContext], Awaitable[bytes]]


class _Unary:
    __slots__ = ("handler",)

    def __init__(self, handler: UnaryHandler) -> None:
        self.handler = handler


class _ServerStream:
    __slots__ = ("handler",)

    def __init__(self, handler: ServerStreamHandler) -> None:
        self.handler = handler


class _ClientStream:
    __slots__ = ("handler",)

    def __init__(self, handler: ClientStreamHandler) -> None:
        self.handler = handler


_Method = _Unary | _ServerStream | _ClientStream


class Server:
    """Serves registered methods; ``stream_full_timeout_s`` is how long a client stream
    whose handler does not read may stall its connection before it is dropped."""

    def __init__(self, *, stream_full_timeout_s: float = STREAM_FULL_TIMEOUT_S) -> None:
        self.stream_full_timeout_s = stream_full_timeout_s
        self._services: dict[str, dict[str, _Method]] = {}
        # Accept loops and connections; close() cancels them.
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._connections = 0
        self._on_idle: Callable[[], object] | None = None

    def on_idle(self, callback: Callable[[], object]) -> None:
        """Calls callback each time the last connection being served ends (a client
        gone); not when the server itself closes them."""
        self._on_idle = callback

    def register_unary(self, service: str, method: str, handler: UnaryHandler) -> None:
        self._register(service, method, _Unary(handler))

    def register_server_stream(
        self, service: str, method: str, handler: ServerStreamHandler
    ) -> None:
        """Each item the handler yields is one Data frame; its end ends the stream."""
        self._register(service, method, _ServerStream(handler))

    def register_client_stream(
        self, service: str, method: str, handler: ClientStreamHandler
    ) -> None:
        self._register(service, method, _ClientStream(handler))

    def _register(self, service: str, method: str, entry: _Method) -> None:
        methods = self._services.setdefault(service, {})
        if method in methods:
            raise ValueError(f"ttrpc method {service}/{method} is already registered")
        methods[method] = entry

    def _lookup(self, service: str, method: str) -> _Method:
        methods = self._services.get(service)
        if methods is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"service {service}")
        entry = methods.get(method)
        if entry is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {method}")
        return entry

    async def serve_connection(self, reader: ByteSource, writer: asyncio.StreamWriter) -> None:
        """Serves one connection until the peer closes it or the server is closed."""
        connection = _Connection(self, Channel(reader, writer))
        if self._closed:
            await connection.channel.close()
            return
        with self._counted():
            await self._run_until_closed(connection.run())

    async def serve(self, listener: socket.socket) -> None:
        """Accepts connections on a bound, listening stream socket (unix or vsock) until
        close(); each connection is served concurrently. The listener stays the caller's
        to close."""
        listener.setblocking(False)
        await self._run_until_closed(self._accept(listener))

    async def close(self) -> None:
        """Stops accepting, cancels the calls in flight and closes the connections."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_until_closed(self, work: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            work.close()
            return
        task = self._spawn(work)
        try:
            await task
        except asyncio.CancelledError:
            # close() cancelled the work: that is how serving ends, not an error. If our
            # own caller is cancelling us, it must see the cancellation.
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                return
            raise

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno not in _TRANSIENT_ACCEPT_ERRNOS:
                    raise
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            self._spawn(self._serve_socket(sock))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve_socket(self, sock: socket.socket) -> None:
        try:
            # open_connection, unlike open_unix_connection, also takes AF_VSOCK sockets.
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_CHUNK_BYTES)
        except BaseException:
            sock.close()  # the peer left before we could serve it, or the server closed
            raise
        with self._counted():
            await _Connection(self, Channel(reader, writer)).run()

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self._connections += 1
        try:
            yield
        finally:
            self._connections -= 1
            if not self._connections and not self._closed and self._on_idle is not None:
                self._on_idle()


class _Call:
    """One request being handled: what the handler gets, and the task running it."""

    __slots__ = ("context", "inbox", "method", "payload", "stream_id", "task")

    def __init__(
        self,
        stream_id: int,
        method: _Method,
        payload: bytes,
        context: CallContext,
        # Only for client streams: the messages the client sends.
        inbox: MessageInbox | None,
    ) -> None:
        self.stream_id = stream_id
        self.method = method
        self.payload = payload
        self.context = context
        self.inbox = inbox
        self.task: asyncio.Task[None] | None = None


class _Connection:
    """One served connection: feeds the protocol, starts and abandons call tasks."""

    def __init__(self, server: Server, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.protocol = ServerConnection()
        self.calls: dict[int, _Call] = {}

    async def run(self) -> None:
        try:
            while data := await self.channel.read():
                for event in self.protocol.receive_data(data):
                    if isinstance(event, ConnectionBroken):
                        return
                    await self._dispatch(event)
        except ChannelClosedError:
            pass  # The peer stopped reading; nothing more can be answered.
        finally:
            # The Go server also cancels a connection's calls when it goes away: their
            # answers could not be delivered.
            tasks = [call.task for call in self.calls.values() if call.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.channel.close()

    async def _dispatch(self, event: ServerEvent) -> None:
        if isinstance(event, RequestReceived):
            await self._start(event)
        elif isinstance(event, DataReceived):
            await self._deliver(event)
        elif isinstance(event, StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None and call.inbox is not None:
                call.inbox.close()
        elif isinstance(event, StreamRejected):
            if event.ends_stream:
                self._abandon(event.stream_id)
            await self.channel.write(self.protocol.send_rejection(event))

    async def _start(self, event: RequestReceived) -> None:
        sid, request = event.stream_id, event.request
        try:
            method = self.server._lookup(request.service, request.method)
        except TtrpcError as exc:
            await self._write(self.protocol.send_error(sid, exc.code, exc.message))
            return
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key.lower(), []).append(pair.value)
        deadline = None
        if request.timeout_nano > 0:
            deadline = asyncio.get_running_loop().time() + request.timeout_nano / 1e9
        context = CallContext(request.service, request.method, metadata, deadline)
        inbox = None
        if isinstance(method, _ClientStream):
            inbox = MessageInbox()
            # Go clients open a client stream without a payload; a non-empty one is the
            # first message (as the Go server treats it).
            if request.payload:
                inbox.put_nowait(request.payload)
            if not event.remote_open:
                inbox.close()
        call = _Call(sid, method, request.payload, context, inbox)
        call.task = asyncio.create_task(self._run(call))
        self.calls[sid] = call
        call.task.add_done_callback(lambda _: self._forget(call))

    def _forget(self, call: _Call) -> None:
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]

    async def _deliver(self, event: DataReceived) -> None:
        call = self.calls.get(event.stream_id)
        if call is None or call.inbox is None:
            return  # A method that takes no stream, or one that already finished.
        try:
            await call.inbox.put(event.payload, self.server.stream_full_timeout_s)
        except TimeoutError:
            self._abandon(event.stream_id)
            await self._write(
                self.protocol.send_error(
                    event.stream_id,
                    Code.RESOURCE_EXHAUSTED,
                    f"handler did not read its stream for {self.server.stream_full_timeout_s}s; "
                    "stream dropped so that the connection's other calls can proceed",
                )
            )

    def _abandon(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        if call is not None and call.task is not None:
            call.task.cancel()

    async def _write(self, frame: Payload | None) -> None:
        if frame is not None:
            await self.channel.write(frame)

    async def _run(self, call: _Call) -> None:
        try:
            # If the connection is going away, run() cleans up.
            with contextlib.suppress(ChannelClosedError):
                await self._write(await self._answer(call))
                if call.context._after_reply:
                    await self.channel.flush()
        finally:
            call.context._replied()

    async def _answer(self, call: _Call) -> bytes | None:
        """Runs the handler under the call's deadline; returns the final frame."""
        sid = call.stream_id
        try:
            async with asyncio.timeout_at(call.context.deadline) as scope:
                return await self._invoke(call)
        except ChannelClosedError:
            raise
        except TimeoutError as exc:
            if scope.expired():
                return self.protocol.send_error(
                    sid, Code.DEADLINE_EXCEEDED, "context deadline exceeded"
                )
            return self.protocol.send_error(sid, Code.UNKNOWN, str(exc) or "TimeoutError")
        except TtrpcError as exc:
            return self.protocol.send_error(sid, exc.code, exc.message)
        except Exception as exc:
            return self.protocol.send_error(sid, Code.UNKNOWN, str(exc) or type(exc).__name__)

    async def _invoke(self, call: _Call) -> bytes | None:
        sid, method, context = call.stream_id, call.method, call.context
        if isinstance(method, _Unary):
            return self.protocol.send_response(sid, await method.handler(call.payload, context))
        if isinstance(method, _ClientStream):
            assert call.inbox is not None
            return self.protocol.send_response(sid, await method.handler(call.inbox, context))
        items = method.handler(call.payload, context)
        try:
            async for item in items:
                frame = self.protocol.send_data(sid, item)
                if frame is None:
                    return None
                await self.channel.write(frame)
        finally:
            # Run the generator's cleanup now, not whenever it is collected.
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
        return self.protocol.send_end(sid)
