"""The agent's end of a virtio-serial port (harpoon.agent.channel), on a FIFO: like the
port, a character file opened once read-write, read and written through two halves."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from harpoon.agent.channel import (
    PORT_BUFFER_BYTES,
    PortReader,
    _PortWriteTransport,
    hold_port,
    open_port,
)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def read_exactly(reader: PortReader, size: int) -> bytes:
    """size bytes from reader, copied out of its views as they come."""
    received = bytearray()
    while len(received) < size:
        data = await reader.read(size - len(received))
        if not data:
            raise EOFError(f"end of file after {len(received)} of {size} bytes")
        received += data
    return bytes(received)


def test_closing_the_writer_closes_both_halves_and_the_port_stays_open(tmp_path: Path) -> None:
    """A host that goes away ends the connection; the agent starts another on the same
    port. Closing must neither raise (it raised NotImplementedError in wait_closed,
    which powered the VM off) nor leave the connection's descriptors open."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def cycle(port: int) -> bytes:
        reader, writer = await open_port(port)
        writer.write(b"ping")
        await writer.drain()
        echoed = await read_exactly(reader, 4)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
        # The read half closes after the write half; its EOF comes as it lets go of
        # its descriptor.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        return echoed

    async def main() -> None:
        before = open_fds()
        port = hold_port(str(fifo))
        held = open_fds()
        assert await cycle(port) == b"ping"
        assert open_fds() == held
        assert await cycle(port) == b"ping"  # and another connection works
        assert open_fds() == held
        os.close(port)
        assert open_fds() == before

    asyncio.run(main())


def test_what_the_host_sends_between_two_connections_reaches_the_next(tmp_path: Path) -> None:
    """The port stays open from one connection to the next: a port closed in between
    (as the agent's were) drops what the host sent meanwhile, its Hello included."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def main() -> bytes:
        port = hold_port(str(fifo))
        _, writer = await open_port(port)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
        host = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO if nobody held it
        os.write(host, b"hello")
        os.close(host)
        reader, writer = await open_port(port)
        try:
            return await asyncio.wait_for(read_exactly(reader, 5), 5)
        finally:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 5)
            os.close(port)

    assert asyncio.run(main()) == b"hello"


def test_pieces_larger_than_the_port_takes_arrive_whole_and_in_order(tmp_path: Path) -> None:
    """Frames in pieces (writelines), far more than a FIFO holds: the writer keeps what
    the port did not take and drain waits until it has all gone out."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    pieces = [bytes([i]) * (300_000 + i) for i in range(12)] + [b"end"]

    async def main() -> bytes:
        port = hold_port(str(fifo))
        reader, writer = await open_port(port)
        received = asyncio.ensure_future(read_exactly(reader, sum(map(len, pieces))))
        for first in range(0, len(pieces), 3):
            writer.writelines(pieces[first : first + 3])
            await asyncio.wait_for(writer.drain(), 10)
            assert writer.transport.get_write_buffer_size() == 0
        data = await asyncio.wait_for(received, 10)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
        os.close(port)
        return data

    assert asyncio.run(main()) == b"".join(pieces)


def test_close_sends_what_is_pending_first_and_a_broken_port_fails_drain() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        protocol = asyncio.streams.FlowControlMixin(loop)
        lost: asyncio.Future[Exception | None] = loop.create_future()
        protocol.connection_lost = lost.set_result  # type: ignore[method-assign]
        transport = _PortWriteTransport(loop, write_end, protocol)
        payload = b"p" * (1 << 20)  # more than the pipe holds: part of it waits
        transport.write(payload)
        assert transport.get_write_buffer_size() > 0
        transport.close()
        assert transport.is_closing() and not lost.done()
        reader = asyncio.StreamReader()
        read_half, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0)
        )
        assert await asyncio.wait_for(read_exactly(reader, len(payload)), 5) == payload
        assert await asyncio.wait_for(lost, 5) is None
        with pytest.raises(OSError):
            os.fstat(write_end)  # the transport closed its descriptor
        read_half.close()

        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        protocol = asyncio.streams.FlowControlMixin(loop)
        writer = asyncio.StreamWriter(
            _PortWriteTransport(loop, write_end, protocol), protocol, None, loop
        )
        os.close(read_end)  # the host end is gone
        writer.write(b"into nothing")
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(writer.drain(), 5)

    asyncio.run(main())


def test_output_for_a_host_that_is_gone_is_dropped_not_waited_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port without a host refuses writes (EAGAIN) and polls as hung up: the pending
    frame is dropped and the connection lost, so that closing it does not wait for ever
    and nothing meant for the old host reaches the next."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        os.close(read_end)  # poll(2) on the write end now reports POLLERR

        def refuse(fd: int, buffers: object) -> int:
            raise BlockingIOError

        monkeypatch.setattr(os, "writev", refuse)
        protocol = asyncio.streams.FlowControlMixin(loop)
        transport = _PortWriteTransport(loop, write_end, protocol)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        writer.write(b"a reply nobody will read")
        assert transport.is_closing() and transport.get_write_buffer_size() == 0
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(writer.drain(), 5)

    asyncio.run(main())


def test_the_port_is_read_in_large_views_never_more_than_asked(tmp_path: Path) -> None:
    """What the host sent is answered in as few reads as the port allows (the driver
    gives one page per read(2): readv takes many at once), as views of the reader's
    buffer, never more than asked."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)
    sent = os.urandom(12 * PORT_BUFFER_BYTES + 100)  # fits a FIFO: all there at once

    async def main() -> list[bytes]:
        port = hold_port(str(fifo))
        reader = PortReader(asyncio.get_running_loop(), os.dup(port))
        os.write(port, sent)
        # Each answer is used before the next read, which reuses the buffer.
        reads = [bytes(await reader.read(50))]
        view = await reader.read(2 * PORT_BUFFER_BYTES)
        assert isinstance(view, memoryview)
        reads.append(bytes(view))
        reads.append(bytes(await reader.read()))
        reader.close()
        os.close(port)
        return reads

    assert asyncio.run(main()) == [
        sent[:50],
        sent[50 : 50 + 2 * PORT_BUFFER_BYTES],
        sent[50 + 2 * PORT_BUFFER_BYTES :],
    ]


def test_a_read_waits_for_the_host_and_close_ends_it(tmp_path: Path) -> None:
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def main() -> tuple[bytes, bytes]:
        port = hold_port(str(fifo))
        reader = PortReader(asyncio.get_running_loop(), os.dup(port))
        waiting = asyncio.ensure_future(reader.read())
        await asyncio.sleep(0.05)  # a window in which nothing may be answered
        assert not waiting.done()
        os.write(port, b"hello")
        first = bytes(await asyncio.wait_for(waiting, 5))
        waiting = asyncio.ensure_future(reader.read())
        await asyncio.sleep(0)
        reader.close()
        closed = await asyncio.wait_for(waiting, 5)
        os.close(port)
        return first, bytes(closed)

    assert asyncio.run(main()) == (b"hello", b"")
