"""The container's processes run by the guest's OCI runtime, crun (Debian's package,
in the initramfs at /usr/bin/crun): namespaces, the spec's mounts, /dev, capabilities,
seccomp, masked and read-only paths, users, rlimits and sysctls as runc would set them.

The agent stays in charge of what crun leaves to its caller: the stdio pipes (crun's
own fds 0-2 are handed to the container), the terminal (received on a console socket),
and exit statuses (crun exits at once and the container's processes become the
agent's children, since it is PID 1; the process table reaps them).

Guest layout: one bundle directory per container under `BUNDLES` (config.json, crun's
log, pid files, exec process files, console sockets); crun's state under `STATE_ROOT`;
the container's cgroup is always `cgroups.CONTAINER_GROUP` whatever the spec says.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import shutil
import socket
import stat
from typing import Any

from harpoon import aio
from harpoon.agent import cgroups
from harpoon.agent.processes import Process, ProcessTable
from harpoon.errdefs import FailedPrecondition, InvalidArgument
from harpoon.ttrpc.status import Code, TtrpcError

CRUN = "/usr/bin/crun"
STATE_ROOT = "/run/crun"
BUNDLES = "/run/harpoon/bundles"
CONSOLE_WAIT_S = 10.0
# The guest's root is the initramfs, which pivot_root cannot leave: crun moves the
# container's root over / and chroots instead. The VM, not the chroot, is the boundary.
CREATE_FLAGS = ("--no-pivot",)
# crun itself runs without address space randomization. Under TCG (no KVM) QEMU keys
# its translated code by virtual address: a randomized crun is translated anew at every
# exec, ~0.15 s of each one; at fixed addresses what earlier execs translated is
# reused. The container's processes keep ASLR: crun sets the spec's personality (which
# the host's guest spec makes explicit, Linux's default: harpoon.shim.transform
# .guest_runtime) before it execs them, and that clears the flag.
ADDR_NO_RANDOMIZE = 0x0040000  # linux/personality.h
# crun copies itself into a sealed memfd and re-executes from it at every start unless
# it already runs from one (CVE-2019-5736: a container must not reach the binary on disk
# through /proc/self/exe; crun 1.8.1's src/libcrun/cloned_binary.c accepts a memfd with
# exactly these seals). The agent makes that copy once, at its start (so it is in a VM
# template's memory), and runs crun from it: one exec per command instead of two, and
# under TCG code at the same addresses, translated once for every later exec.
CRUN_MEMFD_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

_sequence = itertools.count(1)


def _log_message(path: str) -> str:
    """crun's last error, from its log file (text lines; the last one says why)."""
    try:
        with open(path, errors="replace") as log:
            lines = [line.strip() for line in log if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class OciRuntime:
    """crun's commands for the container in this VM, run through the process table."""

    def __init__(self, table: ProcessTable) -> None:
        self.table = table
        self._sealed_crun = sealed_copy(CRUN)
        self._crun_executable = (
            CRUN if self._sealed_crun is None else f"/proc/self/fd/{self._sealed_crun}"
        )

    @staticmethod
    def bundle_dir(container_id: str) -> str:
        if not container_id or "/" in container_id or container_id in (".", ".."):
            raise InvalidArgument(f"bad container id {container_id!r}")
        return os.path.join(BUNDLES, container_id)

    async def _crun(
        self,
        container_id: str,
        command: list[str],
        stdio: tuple[int | None, int | None, int | None] = (None, None, None),
    ) -> None:
        """Runs one crun command; its failure raises with crun's own words."""
        log = os.path.join(self.bundle_dir(container_id), "crun.log")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)
        argv = [CRUN, "--root", STATE_ROOT, f"--log=file:{log}", "--cgroup-manager=cgroupfs"]
        status = await self.table.run_helper(
            [*argv, *command], stdio, ADDR_NO_RANDOMIZE, self._crun_executable
        )
        if status != 0:
            reason = _log_message(log) or f"exit status {status}"
            if status == 127 and not os.path.exists(CRUN):
                reason = f"{CRUN} is not in this guest image"
            # As runc's errors reach containerd: no errdefs class, the runtime's words.
            raise TtrpcError(Code.UNKNOWN, f"crun {command[0]} failed: {reason}")

    async def create(self, process: Process) -> None:
        """`crun create`: the container exists, its init waits for `start`."""
        command, pid_file = self._bundle(process.id, process.spec.container.config)
        since = self.table.generation
        try:
            await self._run_with_io(process, command, process.id)
            self.table.adopt(process, _read_pid(pid_file), since)
            _remove_crun_only_links(process.pid)
        except BaseException:
            await self.delete(process.id)
            raise

    def prepare_rehearsal(self, container_id: str, spec: dict[str, Any]) -> list[str]:
        """Writes the bundle of a container that is only ever created to be deleted
        (harpoon.agent.warm_up); crun's command to create it."""
        command, _ = self._bundle(container_id, spec)
        return [*command, container_id]

    async def rehearse(self, container_id: str, command: list[str]) -> None:
        """Runs prepare_rehearsal's command with no stdio, then deletes the container
        (state, cgroup, bundle). Its init, left to the agent, is reaped as an orphan."""
        try:
            await self._crun(container_id, command)
        finally:
            await self.delete(container_id)

    def _bundle(self, container_id: str, spec: dict[str, Any]) -> tuple[list[str], str]:
        """Writes the container's bundle (its spec as the host made it for this guest's
        crun); crun's create command (less the id) and the init's pid file."""
        bundle = self.bundle_dir(container_id)
        os.makedirs(bundle, exist_ok=True)
        cgroups.ensure_container_group()
        with open(os.path.join(bundle, "config.json"), "w") as config:
            json.dump(spec, config)
        pid_file = os.path.join(bundle, "init.pid")
        return ["create", "--bundle", bundle, f"--pid-file={pid_file}", *CREATE_FLAGS], pid_file

    async def start(self, process: Process) -> int:
        if process.spec.container.poststart_hooks or not _start_created(process.id):
            await self._crun(process.id, ["start", process.id])
        process.started = True
        return process.pid

    async def exec(self, process: Process) -> int:
        """`crun exec --detach`: the process joins the container's namespaces."""
        container_id = process.spec.container_id
        bundle = self.bundle_dir(container_id)
        if not os.path.isdir(bundle):
            raise FailedPrecondition(f"container {container_id!r} does not exist in the guest")
        number = next(_sequence)
        process_file = os.path.join(bundle, f"exec-{number}.json")
        pid_file = os.path.join(bundle, f"exec-{number}.pid")
        with open(process_file, "w") as spec:
            json.dump(process.spec.process.document, spec)
        command = ["exec", "--detach", f"--process={process_file}", f"--pid-file={pid_file}"]
        since = self.table.generation
        try:
            await self._run_with_io(process, command, container_id)
            self.table.adopt(process, _read_pid(pid_file), since)
        finally:
            for path in (process_file, pid_file):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        process.started = True
        return process.pid

    async def _run_with_io(self, process: Process, command: list[str], container_id: str) -> None:
        """Runs crun with the process's stdio as its own (the container inherits it), or
        with a console socket on which crun sends the terminal it made."""
        try:
            if not process.spec.terminal:
                stdin, stdout, stderr = process.child_stdio
                await self._crun(container_id, [*command, container_id], (stdin, stdout, stderr))
                return
            path = os.path.join(self.bundle_dir(container_id), f"console-{next(_sequence)}.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(path)
                listener.listen(1)
                listener.setblocking(False)
                receiving = asyncio.ensure_future(_receive_fd(listener))
                try:
                    await self._crun(
                        container_id, [*command, f"--console-socket={path}", container_id]
                    )
                    master = await asyncio.wait_for(receiving, CONSOLE_WAIT_S)
                finally:
                    receiving.cancel()
            finally:
                listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.table.attach_terminal(process, master)
        finally:
            self.table.release_child_stdio(process)

    async def delete(self, container_id: str) -> None:
        """`crun delete --force` (kills what is left, removes its cgroup and state) and
        the bundle directory."""
        bundle = self.bundle_dir(container_id)
        if os.path.isdir(os.path.join(STATE_ROOT, container_id)):
            with contextlib.suppress(TtrpcError):
                await self._crun(container_id, ["delete", "--force", container_id])
        shutil.rmtree(bundle, ignore_errors=True)


def sealed_copy(path: str) -> int | None:
    """A memfd holding the file at path, sealed as crun's own copy of itself is (see
    CRUN_MEMFD_SEALS); None if there is no such file or no memfd (crun then copies
    itself, as it always does). The fd is close-on-exec: exec opens its path (through
    /proc/self/fd) before it closes those."""
    try:
        with open(path, "rb") as source:
            content = source.read()
        fd = os.memfd_create("harpoon-crun", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return None
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, CRUN_MEMFD_SEALS)
    except OSError:
        os.close(fd)
        return None
    return fd


def _start_created(container_id: str) -> bool:
    """Does what `crun start` does, without an exec of crun (~0.1-0.4 s under TCG):
    False, having done nothing, when anything is not as expected (`crun start` then
    runs and refuses, if it must, in its own words).

    Mirrors crun 1.8.1 (libcrun_container_start in src/libcrun/container.c; the state
    files in src/libcrun/status.c): read the pid in <root>/<id>/status; check that it
    is alive and is the process crun created (its start time in /proc/<pid>/stat, not a
    zombie), else crun refuses ("container is not running"); open <root>/<id>/exec.fifo
    for writing, unlink it and write one byte. The container's init, blocked reading
    the fifo since `crun create`, then execs the container's process; with the fifo
    gone, crun reports the container running. crun would then wait for a NOTIFY_SOCKET
    and run poststart hooks: with either, `crun start` runs instead (the shim drops a
    spec's hooks, the agent sets no NOTIFY_SOCKET; the caller checks for hooks).
    """
    if os.environ.get("NOTIFY_SOCKET"):
        return False
    state = os.path.join(STATE_ROOT, container_id)
    fifo = os.path.join(state, "exec.fifo")
    try:
        with open(os.path.join(state, "status"), "rb") as status_file:
            status = json.load(status_file)
        pid, start_time = status["pid"], status.get("process-start-time", 0)
        if not (isinstance(pid, int) and pid > 0 and isinstance(start_time, int)):
            return False
        if not _is_running(pid, start_time) or not stat.S_ISFIFO(os.lstat(fifo).st_mode):
            return False
        # crun opens it blocking; without a reader (the init gone since the check) that
        # would hang the agent, so: ENXIO, and `crun start` finds the init gone.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return False
    try:
        os.unlink(fifo)
        os.write(fd, b"\0")
    except OSError as error:
        # Past the point of no return, as crun is after its unlink.
        raise TtrpcError(Code.UNKNOWN, f"crun start failed: exec.fifo: {error}") from None
    finally:
        os.close(fd)
    return True


def _is_running(pid: int, start_time: int) -> bool:
    """crun's libcrun_is_container_running: pid alive and, if crun recorded its start
    time, the same process (field 22 of /proc/<pid>/stat) and not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    if not start_time:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
    except OSError:
        return False
    # After the command: state is field 3, starttime field 22.
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


def _remove_crun_only_links(pid: int) -> None:
    """crun (unlike runc) links /dev/core to /proc/kcore in the /dev it makes; the
    container waits for `start`, so its /dev (reached through /proc/<pid>/root) can be
    made runc's before anything in it runs."""
    link = f"/proc/{pid}/root/dev/core"
    with contextlib.suppress(OSError):
        if os.readlink(link) == "/proc/kcore":
            os.unlink(link)


def _read_pid(path: str) -> int:
    try:
        with open(path) as pid_file:
            return int(pid_file.read().strip())
    except (OSError, ValueError) as error:
        raise TtrpcError(Code.UNKNOWN, f"crun left no pid in {path}: {error}") from None


async def _receive_fd(listener: socket.socket) -> int:
    """The one fd crun sends on the console socket (SCM_RIGHTS)."""
    loop = asyncio.get_running_loop()
    connection, _ = await loop.sock_accept(listener)
    with connection:
        connection.setblocking(False)
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(connection, 4096, 1)
            except BlockingIOError:
                await aio.wait_readable(connection.fileno())
                continue
            if not fds:
                raise TtrpcError(Code.UNKNOWN, "crun sent no terminal on the console socket")
            return fds[0]
