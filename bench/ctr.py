"""Timed `ctr` invocations against a benchmark's containerd, from asyncio.

Every `ctr` runs in its own session, so a ^C at the terminal reaches the benchmark (which
then cleans up in order) and not ctr, which would forward it into the container. A ctr
that overruns its timeout is killed with its process group and reported, and the
container it was running is removed; nothing here raises on a slow or failed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass

from harpoon.devenv.containerd import SNAPSHOTTER, Containerd

RUNC_RUNTIME = "io.containerd.runc.v2"
HARPOON_RUNTIME = "io.containerd.harpoon.v1"


@dataclass(frozen=True)
class Runtime:
    """One runtime measured side by side with the others."""

    #: Its name in figures: "runc", "harpoon", "harpoon@2c20733" (`--baseline-commit`).
    name: str
    #: containerd's runtime name (`ctr run --runtime`).
    runtime: str
    #: A harpoon shim: a VM per container, the shim log's lines, VM templates.
    harpoon: bool

    @property
    def id_part(self) -> str:
        """Its name as a part of container IDs (`[A-Za-z0-9]+` joined by `-`)."""
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name)


RUNC = Runtime("runc", RUNC_RUNTIME, harpoon=False)
HARPOON = Runtime("harpoon", HARPOON_RUNTIME, harpoon=True)

#: Bytes read from a container's stdout at a time when only counting them.
COUNT_CHUNK_BYTES = 1 << 20
#: Characters of ctr's stderr quoted in a failure.
STDERR_TAIL_CHARS = 400
#: Timeout of the housekeeping commands (kill, delete).
CLEANUP_TIMEOUT_S = 60.0

#: containerd prints this on every ctr call on cgroup v1 hosts; it is not an error.
_NOISE = re.compile(r'^time="[^"]*" level=warning msg="DEPRECATION: .*$', re.MULTILINE)
#: What ctr prints when the shim answers a call with Unimplemented (or says it lacks it).
UNIMPLEMENTED = re.compile(r"unimplemented|not implemented|not supported", re.IGNORECASE)


@dataclass(frozen=True)
class CtrResult:
    """One ctr invocation: exit status, wall time, stdout bytes, and when they came."""

    argv: tuple[str, ...]
    returncode: int | None  # None: killed after its timeout
    seconds: float
    stdout: bytes
    stdout_bytes: int
    stderr: str
    first_byte_s: float | None = None  # from launch to the first stdout byte
    last_byte_s: float | None = None  # from launch to the last stdout byte
    program: str = "ctr"

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure(self) -> str:
        """Why it failed, in one line."""
        status = "timed out" if self.returncode is None else f"exit status {self.returncode}"
        tail = self.stderr.strip()[-STDERR_TAIL_CHARS:]
        said = f"`{self.program} {' '.join(self.argv)}`: {status}"
        return said + (f": {tail}" if tail else "")


class Ctr:
    """Runs `ctr` against one daemon; tracks the containers it created to remove them."""

    #: What runs (a subclass may run another client of the daemon: `argv`, `_env`).
    PROGRAM = "ctr"

    def __init__(self, daemon: Containerd) -> None:
        self.daemon = daemon
        env = dict(os.environ)
        for name in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"):
            env.pop(name, None)
        env["CONTAINERD_SNAPSHOTTER"] = SNAPSHOTTER
        self._env = env

    def argv(self, *args: str) -> list[str]:
        return [
            str(self.daemon.flavour.ctr),
            "--address",
            self.daemon.address,
            "--namespace",
            self.daemon.namespace,
            *args,
        ]

    async def run(
        self,
        *args: str,
        timeout_s: float,
        keep_stdout: bool = True,
        stdin_path: str | None = None,
    ) -> CtrResult:
        """Runs `ctr ARGS`; with keep_stdout=False only counts stdout (it may be huge).
        Its stdin is the file stdin_path (read by ctr itself: feeding it costs the
        benchmark nothing), else /dev/null."""
        with contextlib.ExitStack() as files:
            stdin = (
                files.enter_context(open(stdin_path, "rb")).fileno()
                if stdin_path is not None
                else asyncio.subprocess.DEVNULL
            )
            return await self._run(args, timeout_s, keep_stdout, stdin)

    async def _run(
        self, args: tuple[str, ...], timeout_s: float, keep_stdout: bool, stdin: int
    ) -> CtrResult:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *self.argv(*args),
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,
        )
        assert process.stdout is not None and process.stderr is not None
        kept = bytearray()
        counted = 0
        first_byte: float | None = None
        last_byte: float | None = None

        async def read_stdout() -> None:
            nonlocal counted, first_byte, last_byte
            assert process.stdout is not None
            while chunk := await process.stdout.read(COUNT_CHUNK_BYTES):
                last_byte = time.monotonic() - started
                if first_byte is None:
                    first_byte = last_byte
                counted += len(chunk)
                if keep_stdout:
                    kept.extend(chunk)

        io = asyncio.gather(read_stdout(), process.stderr.read(), process.wait())
        # When we are cancelled (^C) the gather ends cancelled too; nobody else looks.
        io.add_done_callback(lambda done: done.cancelled() or done.exception())
        returncode: int | None
        try:
            _, stderr_bytes, returncode = await asyncio.wait_for(io, timeout_s)
        except TimeoutError:
            returncode, stderr_bytes = None, b""
        finally:
            # Also on cancellation (^C): no ctr outlives the benchmark.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        seconds = time.monotonic() - started
        stderr = _NOISE.sub("", stderr_bytes.decode(errors="replace")).strip()
        return CtrResult(
            tuple(args), returncode, seconds, bytes(kept), counted, stderr, first_byte, last_byte,
            self.PROGRAM,
        )  # fmt: skip

    async def remove_container(self, container_id: str) -> None:
        """Kills and deletes a container's task and the container, whatever state they are
        in (after a timeout, a failed run, or `ctr run -d`)."""
        await self.run("task", "kill", "--signal", "SIGKILL", container_id,
                       timeout_s=CLEANUP_TIMEOUT_S)  # fmt: skip
        await self.run("task", "delete", "--force", container_id, timeout_s=CLEANUP_TIMEOUT_S)
        await self.run("container", "delete", container_id, timeout_s=CLEANUP_TIMEOUT_S)

    async def run_container(
        self,
        runtime: str,
        image: str,
        container_id: str,
        *command: str,
        timeout_s: float,
        keep_stdout: bool = True,
        detach: bool = False,
        stdin_path: str | None = None,
        options: tuple[str, ...] = (),
    ) -> CtrResult:
        """`ctr run [--rm | -d] --runtime R [OPTIONS…] IMAGE ID CMD…`, its stdin the file
        stdin_path if given; removes the container if the run failed (a `--rm` run that
        failed may have left it behind)."""
        mode = "-d" if detach else "--rm"
        result = await self.run(
            "run", mode, "--runtime", runtime, *options, image, container_id, *command,
            timeout_s=timeout_s, keep_stdout=keep_stdout, stdin_path=stdin_path,
        )  # fmt: skip
        if not result.ok:
            await self.remove_container(container_id)
        return result
