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
import fcntl
import os
import select
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from harpoon import aio
from harpoon.errdefs import FailedPrecondition, InvalidArgument

F_SETPIPE_SZ = 1031  # linux/fcntl.h
FIFO_BYTES = 1 << 20
LOGGER_READY_TIMEOUT_S = 10.0
# How long a logger may take to finish after its input ends (runc's shim waits 12 s).
LOGGER_EXIT_GRACE_S = 12.0
_LOGGER_SCHEMES = ("binary", "binary-v2")


class BinaryLogger:
    """A `binary://PATH?k=v` logging process (nerdctl -d's default), as runc runs it.

    argv is PATH followed by the query's keys and values; the environment names the
    container; fd 3 reads stdout, fd 4 stderr, and fd 5 is written (one byte, or just
    closed by binary:// loggers) once the logger is ready to read.
    """

    def __init__(self, uri: str, namespace: str, container_id: str) -> None:
        url = urlparse(uri)
        args: list[str] = [url.path]
        for key, values in parse_qs(url.query, keep_blank_values=True).items():
            args += [key, values[0]] if values and values[0] else [key]
        out_r, self.stdout = os.pipe2(os.O_CLOEXEC)
        err_r, self.stderr = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        env = {**os.environ, "CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace}

        def wire_fds() -> None:
            # Runs in the child: put the pipe ends at exactly 3, 4 and 5.
            high = [os.dup(fd) for fd in (out_r, err_r, ready_w)]
            for target, fd in enumerate(high, start=3):
                os.dup2(fd, target)

        try:
            self.process = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(3, 4, 5), preexec_fn=wire_fds,
                start_new_session=True,
            )  # fmt: skip
        except OSError as error:
            for fd in (out_r, err_r, ready_r, ready_w, self.stdout, self.stderr):
                os.close(fd)
            raise FailedPrecondition(f"cannot start the logger {url.path}: {error}") from None
        finally:
            for fd in (out_r, err_r, ready_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        try:
            ready, _, _ = select.select([ready_r], [], [], LOGGER_READY_TIMEOUT_S)
            byte = os.read(ready_r, 1) if ready else None
        finally:
            os.close(ready_r)
        if byte is None or (not byte and url.scheme == "binary-v2"):
            self.close()
            raise FailedPrecondition(f"the logger {url.path} did not become ready")
        os.set_blocking(self.stdout, False)
        os.set_blocking(self.stderr, False)

    def close(self) -> None:
        """Ends the logger's input; it is stopped if it does not finish by itself."""
        for fd in (self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)
        process = self.process
        threading.Thread(target=_stop_logger, args=(process,), daemon=True).start()


def _stop_logger(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(LOGGER_EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # fewer wake-ups per chunk written
                fcntl.fcntl(fd, F_SETPIPE_SZ, FIFO_BYTES)
            return fd
        return os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
        )
    if url.scheme == "file":
        Path(url.path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return os.open(
            url.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
        )
    raise InvalidArgument(f"unknown STDIO scheme {url.scheme!r} in {target!r}")


@dataclass
class ProcessIO:
    """The descriptors one process's output goes to (None: discarded)."""

    stdout: int | None = None
    stderr: int | None = None
    _owned: list[int] = field(default_factory=list)
    _logger: BinaryLogger | None = None

    @classmethod
    def open(
        cls, stdout: str, stderr: str, *, namespace: str = "", container_id: str = ""
    ) -> ProcessIO:
        io = cls()
        if urlparse(stdout).scheme in _LOGGER_SCHEMES:
            # One logger takes both streams (with a terminal, stderr is unused).
            io._logger = BinaryLogger(stdout, namespace, container_id)
            io.stdout = io._logger.stdout
            io.stderr = io._logger.stderr if stderr else None
            return io
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
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()
        self.stdout = self.stderr = None


async def pump(
    chunks: AsyncIterator[bytes],
    fd: int,
    before_write: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Copies an async iterator of byte chunks into fd, all of it, in order; awaiting
    before_write, if given, before each chunk is written."""
    async for chunk in chunks:
        if before_write is not None:
            await before_write()
        await aio.write_all(fd, chunk)


def open_stdin(path: str) -> int:
    """The stdin FIFO, opened read-write so that it never reads EOF: as under runc, a
    process's stdin closes on CloseIO, not when a client closes its end of the FIFO."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # bigger reads: fewer, larger StdinChunks
        fcntl.fcntl(fd, F_SETPIPE_SZ, FIFO_BYTES)
    return fd


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
