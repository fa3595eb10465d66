"""The agent's end of the host channel: the virtio-serial port named harpoon.agent.

Without udev there are no friendly names in /dev: the port is the /dev/vportNpM whose
/sys/class/virtio-ports entry has our name. The port reads EOF while no host is
connected, so the caller starts connection after connection on it, each with a reader
and a writer on duplicates of one descriptor that stays open for the agent's life (`hold_port`: a
port can only be opened once). Closing the port between connections would lose what a
host sent meanwhile: the driver discards a closed port's unread data, and a host that
connected between the agent's EOF and its reopening lost its Hello and waited forever.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
from collections import deque
from collections.abc import Iterable

from harpoon.api.names import AGENT_PORT_NAME

PORTS_DIR = "/sys/class/virtio-ports"
PORT_WAIT_S = 10.0
PORT_POLL_S = 0.005
# Pieces given to one writev(2) (Linux's IOV_MAX is 1024).
WRITEV_MAX_PIECES = 64
# The virtio console driver queues what the host sends in buffers of a page each and
# one read(2) returns at most one of them: the port is read with readv(2), one page per
# piece, up to READ_BATCH_BYTES at once.
PORT_BUFFER_BYTES = 4096
READV_MAX_PIECES = 64
READ_BATCH_BYTES = 1 << 20


def find_port(name: str = AGENT_PORT_NAME) -> str | None:
    try:
        entries = os.listdir(PORTS_DIR)
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(PORTS_DIR, entry, "name")) as port_name:
                if port_name.read().strip() == name:
                    return "/dev/" + entry
        except OSError:
            continue
    return None


async def wait_for_port(name: str = AGENT_PORT_NAME) -> str:
    """The device path of the named port, once the driver has created it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PORT_WAIT_S
    while (path := find_port(name)) is None or not os.path.exists(path):
        if loop.time() > deadline:
            raise RuntimeError(f"no virtio-serial port named {name!r} after {PORT_WAIT_S} s")
        await asyncio.sleep(PORT_POLL_S)
    return path


class _WriteHalfProtocol(asyncio.streams.FlowControlMixin):
    """The protocol of a port's write half, which asyncio has no stream class for.

    StreamWriter.wait_closed asks its protocol for a close waiter, which only
    StreamReaderProtocol has (FlowControlMixin raises NotImplementedError, which took
    PID 1 down when a host disconnected). Losing this half closes the read half too,
    so that a connection never outlives its writer with a reader left on the port.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, read_half: PortReader):
        super().__init__(loop=loop)
        self._read_half = read_half
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._read_half.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


class _PortWriteTransport(asyncio.WriteTransport):
    """The port's write half: writes go straight to the descriptor, until the port takes
    no more, and pieces (writelines) with writev(2), never joined; what the port did not
    take waits as views of the caller's bytes, and the protocol is paused until it is
    gone, so that Channel.write's drain waits for the whole frame.

    Under TCG each copy of a MiB costs the guest ~5 ms, and the virtio console driver
    takes at most 32 KiB per write: asyncio's pipe transport copied every frame into its
    buffer and wrote one 32 KiB slice of it per turn of the event loop, which held the
    agent's output to ~38 MiB/s where the port itself carries ~200 (a measurement in
    the guest, 2026-12-02).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, protocol: asyncio.BaseProtocol
    ) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._pending: deque[memoryview] = deque()
        self._pending_bytes = 0
        self._closing = False
        self._closed = False
        self._paused = False
        loop.call_soon(protocol.connection_made, self)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closing:
            return  # as asyncio's transports do: the stream's writer checks first
        views = [memoryview(data).cast("B") for data in list_of_data if len(data)]
        if not views:
            return
        was_idle = not self._pending
        self._pending.extend(views)
        self._pending_bytes += sum(len(view) for view in views)
        if was_idle:
            self._flush()
            if self._pending and not self._closed:
                self._loop.add_writer(self._fd, self._on_writable)
        if self._pending and not self._paused:
            self._paused = True
            self._protocol.pause_writing()

    def _flush(self) -> None:
        """Writes what the port takes now."""
        while self._pending:
            try:
                written = os.writev(
                    self._fd, list(itertools.islice(self._pending, WRITEV_MAX_PIECES))
                )
            except (BlockingIOError, InterruptedError):
                if self._host_gone():
                    self._lose(ConnectionResetError("no host on the port any more"))
                return
            except OSError as error:
                self._lose(error)
                return
            if not written:
                return  # nothing taken: wait until the port says it is writable
            self._pending_bytes -= written
            while written:
                head = self._pending[0]
                if written < len(head):
                    self._pending[0] = head[written:]
                    break
                written -= len(head)
                self._pending.popleft()

    def _host_gone(self) -> bool:
        """Whether the port hangs up: the driver refuses writes while no host is
        connected and reports POLLHUP, which would also wake the writer again and again.
        What is pending was for a host that is gone and must not reach the next one."""
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def _on_writable(self) -> None:
        self._flush()
        if self._pending or self._closed:
            return
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._lose(None)
        elif self._paused:
            self._paused = False
            self._protocol.resume_writing()

    def _lose(self, error: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._loop.remove_writer(self._fd)
        self._pending.clear()
        self._pending_bytes = 0
        os.close(self._fd)
        self._loop.call_soon(self._protocol.connection_lost, error)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._pending:
            self._lose(None)

    def abort(self) -> None:
        self._lose(None)

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return self._pending_bytes

    def can_write_eof(self) -> bool:
        return False


class PortReader:
    """The port's read half: read(n) answers what the port holds now, up to n bytes,
    read with readv(2) straight into one buffer of the reader's own and answered as a
    view of it, valid until the next read() (ttrpc's Channel hands it to its frame
    decoder, which copies what it keeps). Reads happen only when asked for, so a
    connection that stops reading leaves the host's bytes in the port (backpressure).

    asyncio's pipe transport read the port a page at a time (the driver's receive
    buffers), one turn of the event loop each, and its StreamReader copied every byte
    twice more: stdin reached a process at ~6 MiB/s under TCG, the agent's CPU spent
    on those turns (a profile in the guest, 2026-12-06).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd: int | None = fd
        self._view = memoryview(bytearray(READ_BATCH_BYTES))
        self._pages = [
            self._view[start : start + PORT_BUFFER_BYTES]
            for start in range(0, READ_BATCH_BYTES, PORT_BUFFER_BYTES)
        ]
        self._waiter: asyncio.Future[None] | None = None

    async def read(self, n: int = READ_BATCH_BYTES) -> bytes | memoryview:
        """Up to n bytes (whole pages unless n or the end of what came is shorter);
        b"" at end of file or once closed. OSError if the port fails. n < 0: as much as
        one read takes (READ_BATCH_BYTES), as StreamReader.read(-1) never ends early."""
        wanted = READ_BATCH_BYTES if n < 0 else max(1, min(n, READ_BATCH_BYTES))
        while self._fd is not None:
            data = self._read_now(wanted)
            if data is not None:
                return data
            self._waiter = self._loop.create_future()
            self._loop.add_reader(self._fd, self._wake)
            try:
                await self._waiter
            finally:
                self._waiter = None
                if self._fd is not None:
                    self._loop.remove_reader(self._fd)
        return b""

    def _read_now(self, n: int) -> bytes | memoryview | None:
        """What the port holds, up to n bytes; None if nothing yet."""
        assert self._fd is not None
        if n < PORT_BUFFER_BYTES:
            try:
                return os.read(self._fd, n)
            except (BlockingIOError, InterruptedError):
                return None
        pages = n // PORT_BUFFER_BYTES
        filled = 0
        while filled < pages * PORT_BUFFER_BYTES:
            first = filled // PORT_BUFFER_BYTES
            wanted = self._pages[first : min(pages, first + READV_MAX_PIECES)]
            try:
                got = os.readv(self._fd, wanted)
            except (BlockingIOError, InterruptedError):
                if not filled:
                    return None
                break
            except OSError:
                if filled:
                    break  # what came first is answered; the error comes next time
                raise
            if not got:
                break  # end of file: b"" unless something came first
            filled += got
            if got < len(wanted) * PORT_BUFFER_BYTES:
                break  # a page not full: what the host sent so far
        return self._view[:filled] if filled else b""

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Lets go of the descriptor; a read waiting now or later answers b""."""
        if self._fd is None:
            return
        if self._waiter is not None:
            self._loop.remove_reader(self._fd)
            self._wake()
        os.close(self._fd)
        self._fd = None

    def is_closing(self) -> bool:
        return self._fd is None


def hold_port(path: str) -> int:
    """Opens the port for the agent's life: connections are made on this descriptor's
    duplicates (open_port)."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


async def open_port(port_fd: int) -> tuple[PortReader, asyncio.StreamWriter]:
    """A reader and a stream writer on the port held as port_fd, for one connection:
    closing the writer closes both, the port stays open."""
    loop = asyncio.get_running_loop()
    reader = PortReader(loop, os.dup(port_fd))
    write_protocol = _WriteHalfProtocol(loop, reader)
    write_transport = _PortWriteTransport(loop, os.dup(port_fd), write_protocol)
    writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
    return reader, writer
