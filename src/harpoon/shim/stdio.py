"""The host ends of a process's stdio: containerd's FIFOs, files and loggers.

stdout and stderr FIFOs are opened read-write: the open never blocks waiting for the
client, and the pipe stays alive if the client detaches (runc opens a second,
read-only descriptor for the same reason). Output is pumped from the agent's
ReadOutput stream into these descriptors with backpressure: a slow reader slows the
process in the guest instead of filling the shim's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from harpoon import aio
from harpoon.errdefs import InvalidArgument, Unimplemented


def _open_output(target: str) -> int:
    """A non-blocking write descriptor for one stdout/stderr target of containerd's."""
    url = urlparse(target)
    if url.scheme in ("", "fifo"):
        path = url.path if url.scheme else target
        try:
            is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
        except FileNotFoundError:
            is_fifo = False
        if is_fifo:
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
        )
    if url.scheme == "file":
        Path(url.path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return os.open(
            url.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
        )
    if url.scheme in ("binary", "binary-v2"):
        raise Unimplemented(f"binary:// loggers are not supported yet (asked for {target})")
    raise InvalidArgument(f"unknown STDIO scheme {url.scheme!r} in {target!r}")


@dataclass
class ProcessIO:
    """The descriptors one process's output goes to (None: discarded)."""

    stdout: int | None = None
    stderr: int | None = None
    _owned: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, stdout: str, stderr: str) -> ProcessIO:
        io = cls()
        try:
            if stdout:
                io.stdout = _open_output(stdout)
                io._owned.append(io.stdout)
            if stderr:
                if stderr == stdout and urlparse(stdout).scheme == "file":
                    io.stderr = io.stdout
                else:
                    io.stderr = _open_output(stderr)
                    io._owned.append(io.stderr)
        except BaseException:
            io.close()
            raise
        return io

    def close(self) -> None:
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()
        self.stdout = self.stderr = None


async def pump(chunks: AsyncIterator[bytes], fd: int) -> None:
    """Copies an async iterator of byte chunks into fd, all of it, in order."""
    async for chunk in chunks:
        await aio.write_all(fd, chunk)


def open_stdin(path: str) -> int:
    """The stdin FIFO, opened read-write so that it never reads EOF: as under runc, a
    process's stdin closes on CloseIO, not when a client closes its end of the FIFO."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


class StdinForwarder:
    """Yields what arrives on the stdin FIFO until close(), then what is left in it.

    Draining at close matters: a client writes its last bytes and then calls CloseIO,
    so those bytes are in the pipe when the close is asked for.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._closing = asyncio.Event()

    def close(self) -> None:
        self._closing.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self._closing.is_set():
            read = asyncio.ensure_future(aio.read_some(self.fd))
            closing = asyncio.ensure_future(self._closing.wait())
            done, _ = await asyncio.wait({read, closing}, return_when=asyncio.FIRST_COMPLETED)
            closing.cancel()
            if read not in done:
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read
                break
            data = read.result()
            if not data:
                return
            yield data
        while True:
            try:
                data = os.read(self.fd, aio.READ_CHUNK_BYTES)
            except BlockingIOError:
                return
            if not data:
                return
            yield data
