"""The ttrpc client: many concurrent calls multiplexed over one connection.

One reader task routes answers to the calls waiting for them. A call whose connection
goes away fails with ConnectionClosedError at once; it must never wait forever for an
answer that cannot come, and a slow stream consumer must never make the client buffer
without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from dataclasses import dataclass, field

from harpoon.api.ttrpc import request_pb2
from harpoon.ttrpc.channel import (
    READ_CHUNK_BYTES,
    STREAM_FULL_TIMEOUT_S,
    Channel,
    ChannelClosedError,
    MessageInbox,
)
from harpoon.ttrpc.codec import Flags
from harpoon.ttrpc.protocol import (
    ClientConnection,
    ConnectionBroken,
    DataReceived,
    ResponseReceived,
    StreamEnded,
)
from harpoon.ttrpc.status import Code, ConnectionClosedError, TtrpcError


@dataclass
class _PendingCall:
    answer: asyncio.Future[bytes] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # Only for server streams: their messages, in order.
    inbox: MessageInbox | None = None

    def finish(self, payload: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(payload)
        if self.inbox is not None:
            self.inbox.close()

    def fail(self, error: TtrpcError) -> None:
        if not self.answer.done():
            self.answer.set_exception(error)
            # Streams report the error through the inbox; nobody may await the future.
            self.answer.exception()
        if self.inbox is not None:
            self.inbox.close(error)


class Client:
    """A ttrpc client on an open connection; create it inside the event loop.

    ``stream_full_timeout_s``: how long a server stream nobody reads may stall the
    connection (and so every other call's answer) before it fails RESOURCE_EXHAUSTED;
    None waits for the consumer forever."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        stream_full_timeout_s: float | None = STREAM_FULL_TIMEOUT_S,
    ) -> None:
        self._channel = Channel(reader, writer)
        self._protocol = ClientConnection()
        self._calls: dict[int, _PendingCall] = {}
        self._stream_full_timeout_s = stream_full_timeout_s
        # Held from choosing a stream id until its Request is written, so that ids reach
        # the server in increasing order.
        self._start_lock = asyncio.Lock()
        self._close_reason: str | None = None
        self._closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect_unix(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK_BYTES)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Closes the connection; calls still pending fail with ConnectionClosedError."""
        self._close_reason = self._close_reason or "ttrpc: client closed"
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """A unary call; its answer's payload, or TtrpcError with the server's status.

        ``timeout`` (seconds) is sent to the server and also enforced here."""
        deadline = self._deadline(timeout)
        request = _request(service, method, payload, timeout, metadata)
        async with _DeadlineScope(deadline, service, method):
            sid, call = await self._start(request, Flags.NONE, streaming=False)
            try:
                return await call.answer
            finally:
                self._forget(sid)

    async def stream(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """A server-streaming call: the messages the server sends, until it ends."""
        deadline = self._deadline(timeout)
        request = _request(service, method, payload, timeout, metadata)
        async with _DeadlineScope(deadline, service, method):
            sid, call = await self._start(request, Flags.REMOTE_CLOSED, streaming=True)
        assert call.inbox is not None
        # A timeout scope must not span a yield (it would fire in the consumer's code),
        # so the deadline fails the stream instead.
        expiry = None
        if deadline is not None:
            expiry = asyncio.get_running_loop().call_at(
                deadline, call.fail, _deadline_error(service, method)
            )
        try:
            async for message in call.inbox:
                yield message
        finally:
            if expiry is not None:
                expiry.cancel()
            self._forget(sid)

    async def call_client_stream(
        self,
        service: str,
        method: str,
        messages: AsyncIterable[bytes],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """A client-streaming call: sends every message, closes the stream, and returns
        the answer's payload. Stops sending early if the server answers first."""
        deadline = self._deadline(timeout)
        request = _request(service, method, b"", timeout, metadata)
        async with _DeadlineScope(deadline, service, method):
            sid, call = await self._start(request, Flags.REMOTE_OPEN, streaming=False)
            try:
                async for message in messages:
                    if call.answer.done():
                        break
                    await self._send(self._protocol.send_data(sid, message))
                else:
                    await self._send(self._protocol.send_end(sid))
                return await call.answer
            finally:
                self._forget(sid)

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    async def _start(
        self, request: request_pb2.Request, flags: Flags, *, streaming: bool
    ) -> tuple[int, _PendingCall]:
        async with self._start_lock:
            if self._closed.is_set():
                raise ConnectionClosedError(self._close_reason or "ttrpc: connection closed")
            sid, frame = self._protocol.start_request(request, flags)
            call = _PendingCall(inbox=MessageInbox() if streaming else None)
            self._calls[sid] = call
            try:
                await self._send(frame)
            except BaseException:
                self._forget(sid)
                raise
        return sid, call

    async def _send(self, frame: bytes) -> None:
        try:
            await self._channel.write(frame)
        except ChannelClosedError as exc:
            raise ConnectionClosedError(f"ttrpc: connection closed: {exc}") from exc

    def _forget(self, sid: int) -> None:
        self._calls.pop(sid, None)
        self._protocol.forget(sid)

    async def _read(self) -> None:
        try:
            while data := await self._channel.read():
                for event in self._protocol.receive_data(data):
                    if isinstance(event, ConnectionBroken):
                        self._close_reason = f"ttrpc: bad data from server: {event.reason}"
                        return
                    await self._dispatch(event)
        finally:
            self._closed.set()
            error = ConnectionClosedError(self._close_reason or "ttrpc: connection closed")
            for call in self._calls.values():
                call.fail(error)
            self._calls.clear()
            await self._channel.close()

    async def _dispatch(self, event: ResponseReceived | DataReceived | StreamEnded) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:
            return
        if isinstance(event, ResponseReceived):
            self._forget(event.stream_id)
            if event.code == Code.OK:
                call.finish(event.payload)
            else:
                call.fail(TtrpcError(event.code, event.message))
        elif isinstance(event, StreamEnded):
            self._forget(event.stream_id)
            call.finish(b"")
        elif isinstance(event, DataReceived) and call.inbox is not None:
            try:
                await call.inbox.put(event.payload, self._stream_full_timeout_s)
            except TimeoutError:
                self._forget(event.stream_id)
                call.fail(
                    TtrpcError(
                        Code.RESOURCE_EXHAUSTED,
                        f"stream was not read for {self._stream_full_timeout_s}s; "
                        "dropped so that other calls on the connection can proceed",
                    )
                )


def _request(
    service: str,
    method: str,
    payload: bytes,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
) -> request_pb2.Request:
    request = request_pb2.Request(service=service, method=method, payload=payload)
    if timeout is not None:
        # At least 1ns: zero on the wire means "no deadline".
        request.timeout_nano = max(1, int(timeout * 1e9))
    for key, value in (metadata or {}).items():
        request.metadata.add(key=key.lower(), value=value)
    return request


def _deadline_error(service: str, method: str) -> TtrpcError:
    return TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: context deadline exceeded")


class _DeadlineScope:
    """``asyncio.timeout_at`` that reports expiry as DEADLINE_EXCEEDED."""

    def __init__(self, deadline: float | None, service: str, method: str) -> None:
        self._timeout = asyncio.timeout_at(deadline)
        self._service = service
        self._method = method

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)  # type: ignore[arg-type]
        except TimeoutError as timeout:
            if self._timeout.expired():
                raise _deadline_error(self._service, self._method) from timeout
            raise
