"""Asyncio reads and writes on raw non-blocking file descriptors (pipes, FIFOs), and
the wait for a child's exit through its pidfd.

asyncio's pipe transports misjudge a FIFO the shim holds open for reading and writing
(they take readable data for a hang-up), and the agent wants plain fds around fork,
so both sides use these two small loops instead. Standard library only: the guest
imports this.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

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


async def process_exit(popen: subprocess.Popen[bytes]) -> int:
    """popen's exit status once it has exited, reaped by popen itself: through a pidfd
    where Linux has them (no thread, no SIGCHLD handler), else a thread blocked in
    waitpid (as asyncio's own default child watcher does). Cancelled, it leaves the
    process as it was: running, or exited and not yet reaped."""
    if popen.returncode is not None:
        return popen.returncode
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # not Linux ≥ 5.3
        return await asyncio.to_thread(popen.wait)
    try:
        await wait_readable(pidfd)
    finally:
        os.close(pidfd)
    # Readable means exited: this reaps it without blocking.
    return popen.wait()
