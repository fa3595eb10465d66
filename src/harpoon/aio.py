"""Asyncio reads and writes on raw non-blocking file descriptors (pipes, FIFOs).

asyncio's pipe transports misjudge a FIFO the shim holds open for reading and writing
(they take readable data for a hang-up), and the agent wants plain fds around fork,
so both sides use these two small loops instead. Standard library only: the guest
imports this.
"""

from __future__ import annotations

import asyncio
import os

READ_CHUNK_BYTES = 256 * 1024


async def _ready(fd: int, for_write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if for_write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if for_write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def wait_readable(fd: int) -> None:
    """Returns once fd is readable (or at end of file)."""
    await _ready(fd, for_write=False)


async def read_some(fd: int, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
    """The next bytes available on a non-blocking fd; b"" at end of file."""
    while True:
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            await _ready(fd, for_write=False)


async def write_all(fd: int, data: bytes | memoryview) -> None:
    """Writes all of data to a non-blocking fd, waiting while it is full."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, for_write=True)
            continue
        view = view[written:]
