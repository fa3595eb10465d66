"""The asyncio pieces server and client share: the byte channel and the stream inbox.

``Channel`` owns one connection's reader (a StreamReader, or any ``ByteSource``) and
StreamWriter: it reads in large chunks and writes whole frames one at a time, waiting
for the transport to drain so a slow peer slows us down instead of filling memory.
``MessageInbox`` queues one stream's incoming messages for its consumer, bounded in
bytes. Neither knows the protocol; they must never parse frames or decide anything
about streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

from harpoon.ttrpc.codec import MAX_MESSAGE_BYTES, Parts, Payload
from harpoon.ttrpc.status import TtrpcError

# Large reads keep per-chunk Python work small next to the bytes moved.
READ_CHUNK_BYTES = 256 << 10
# How long a stream's full inbox may hold up the connection's reader before the stream
# is failed (Go ttrpc waits the same); other streams on the connection wait meanwhile.
STREAM_FULL_TIMEOUT_S = 5.0
# Each queued message also costs its bookkeeping, so empty messages are bounded too.
_MESSAGE_OVERHEAD_BYTES = 64


class ChannelClosedError(Exception):
    """The connection cannot carry more bytes."""


class ByteSource(Protocol):
    """Where a connection's bytes come from: an asyncio.StreamReader, or a reader that
    answers views of its own buffer (the guest agent's port), valid until its next read."""

    async def read(self, n: int = -1, /) -> bytes | memoryview: ...


class Channel:
    def __init__(self, reader: ByteSource, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()

    async def read(self) -> bytes | memoryview:
        """The next bytes from the peer, to be used before the next read (they may be a
        view of the reader's buffer); b"" once it closed or the connection broke."""
        try:
            return await self._reader.read(READ_CHUNK_BYTES)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: Payload) -> None:
        """Writes one or more whole frames; ChannelClosedError if that is impossible.
        Parts go to the transport's writelines, which a transport able to write pieces
        (the guest agent's port) writes without joining them.

        The lock keeps frames whole and lets a single writer at a time wait for drain,
        which bounds what sits in the transport's buffer."""
        async with self._write_lock:
            if self._writer.is_closing():
                raise ChannelClosedError("connection closed")
            try:
                if isinstance(data, Parts):
                    self._writer.writelines(data.pieces)
                else:
                    self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise ChannelClosedError(str(exc)) from exc

    async def flush(self) -> None:
        """Waits until the transport holds nothing more: all that was written has been
        handed to the operating system (a drain leaves up to the transport's high-water
        mark behind, which a process exiting then would lose). ChannelClosedError if
        the connection breaks first."""
        async with self._write_lock:
            transport = self._writer.transport
            if transport.get_write_buffer_size() == 0:
                return
            try:
                low, high = transport.get_write_buffer_limits()
            except NotImplementedError:
                # A transport without limits pauses while it holds anything (the
                # agent's port): its drain is already this wait.
                limits = None
            else:
                limits = (low, high)
                # Paused while anything is buffered, resumed once nothing is: the
                # drain below waits exactly for the buffer to empty.
                transport.set_write_buffer_limits(high=0, low=0)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise ChannelClosedError(str(exc)) from exc
            finally:
                if limits is not None and not transport.is_closing():
                    transport.set_write_buffer_limits(high=limits[1], low=limits[0])

    async def close(self) -> None:
        self._writer.close()
        # The peer may already be gone; the connection is closed either way.
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class MessageInbox:
    """One stream's received messages, waiting for its consumer; iterate to consume.

    Holds at most about ``limit_bytes`` (always at least one message): past that,
    ``put`` waits, which stops the connection's reader and so pushes back on the peer.
    """

    def __init__(self, limit_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._limit_bytes = limit_bytes
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._closed = False
        self._error: TtrpcError | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def put_nowait(self, message: bytes) -> None:
        """Queues a message regardless of the limit (for a stream's first message)."""
        if self._closed:
            return
        self._items.append(message)
        self._bytes += len(message) + _MESSAGE_OVERHEAD_BYTES
        self._readable.set()
        if self._bytes >= self._limit_bytes:
            self._writable.clear()

    async def put(self, message: bytes, timeout_s: float | None) -> None:
        """Queues a message once there is room; TimeoutError if none came in time.
        Messages put after close are dropped: nobody will read them."""
        if not self._writable.is_set():
            async with asyncio.timeout(timeout_s):
                await self._writable.wait()
        self.put_nowait(message)

    def close(self, error: TtrpcError | None = None) -> None:
        """No more messages; the consumer gets those queued, then ``error`` if given."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._readable.set()
        self._writable.set()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self._items:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        message = self._items.popleft()
        self._bytes -= len(message) + _MESSAGE_OVERHEAD_BYTES
        if self._bytes < self._limit_bytes:
            self._writable.set()
        return message
