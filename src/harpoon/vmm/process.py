"""A VMM's host process: spawned without an event loop, waited for with one.

A shim launches its VM before it has loaded asyncio (harpoon.shim.daemon: the VMM's
own start-up then overlaps the shim's), so spawning is plain `subprocess` and needs no
loop; waiting is asynchronous, through a pidfd where Linux has them (no thread, no
SIGCHLD handler) and a thread blocked in waitpid elsewhere (as asyncio's own default
child watcher does). The process must never be reaped by anyone else: nothing here
registers it with asyncio's child watchers.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harpoon import linux, private
from harpoon.vmm.base import LOWEST_PRIORITY_NICE

if TYPE_CHECKING:
    import asyncio


def die_with_parent() -> None:
    """A VMM child's pre-exec step: it gets SIGKILL if the shim dies (on Linux; macOS
    has no such signal: `shim delete` ends it by its pid file, harpoon.vmm.leftovers),
    leads a session of its own, and what it creates (console log, sockets, pid file, a
    template's memory file, a saved state) is root's alone: it holds the guest's data.
    Files the guest creates in a 9p share are not cut by that umask: QEMU sets their
    modes as the guest asks."""
    # Runs in the forked child before exec: no imports here (another thread of the
    # shim may hold an import's lock).
    if linux.HAS_PARENT_DEATH_SIGNAL:
        linux.set_parent_death_signal(signal.SIGKILL)
    os.setsid()
    os.umask(private.UMASK)


def die_with_parent_at_lowest_priority() -> None:
    """die_with_parent, for background work (building a template)."""
    die_with_parent()
    os.nice(LOWEST_PRIORITY_NICE)


class VmmProcess:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._exited: asyncio.Future[int] | None = None

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        stderr_path: Path,
        preexec: Callable[[], None],
        pass_fds: Sequence[int] = (),
    ) -> VmmProcess:
        """Starts argv with no stdin or stdout, its stderr in stderr_path and pass_fds
        open at the same numbers; `preexec` runs in the child before exec (and must
        import nothing: see subprocess). The log is root's alone, as the VM's state is."""
        with open(private.open_file(stderr_path, os.O_WRONLY | os.O_TRUNC), "wb") as stderr:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=preexec,
                pass_fds=pass_fds,
            )
        return cls(popen)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it is known (after wait(), or a poll finding it gone)."""
        return self._popen.poll()

    # Popen signals only a process it has not reaped (and ignores one that has just
    # exited): a recycled pid is never hit, and a gone process is no error.
    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()

    async def wait(self) -> int:
        """The exit status, once the process has exited (and been reaped)."""
        import asyncio  # loaded by the time anyone waits; not when the VMM is spawned

        if self._popen.poll() is not None:
            return self._popen.returncode
        if self._exited is None:
            self._exited = asyncio.ensure_future(self._reap())
        # Shielded: one waiter giving up must not stop the others' wait.
        return await asyncio.shield(self._exited)

    async def _reap(self) -> int:
        from harpoon import aio  # loads asyncio: not when the VMM is spawned

        return await aio.process_exit(self._popen)
