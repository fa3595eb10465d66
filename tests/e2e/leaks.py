"""What an e2e test may not leave in its containerd (the `containerd` fixtures check),
and on the host around one container's VM (`VmWatch`, `vm_leaks`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.host import is_under, mount_points
from harpoon.shim import paths
from harpoon.vmm.leftovers import GVPROXY_PID_FILE, HELPER_PID_PREFIX, PID_FILE_NAME

#: How long shims get to exit after their last task is deleted.
SHIM_EXIT_TIMEOUT_S = 10.0
#: How often VmWatch.watching looks at the host's processes and mounts.
WATCH_INTERVAL_S = 0.2


def fail_on_leaks(daemon: Containerd) -> None:
    """Fails the test (its containers removed first) if it left anything in daemon."""
    leaks = leaks_of(daemon)
    if leaks:
        daemon.remove_all_containers()
        pytest.fail(f"test left behind: {'; '.join(leaks)}", pytrace=False)


def leaks_of(daemon: Containerd, container_id: str | None = None) -> list[str]:
    """What a test left in daemon: tasks, containers, shims (given time to exit), mounts.
    With container_id, that container's task, container and shim alone (others may
    run on), and every mount under the daemon's directory still."""
    leaks = []

    def ours(ids: list[str]) -> list[str]:
        return ids if container_id is None else [i for i in ids if i == container_id]

    def shims() -> list[str]:
        found = daemon.shims()
        if container_id is not None:
            found = [s for s in found if s.flag("id") == container_id]
        return [str(s) for s in found]

    if ours(daemon.tasks()):
        leaks.append(f"tasks {ours(daemon.tasks())}")
    if ours(daemon.containers()):
        leaks.append(f"containers {ours(daemon.containers())}")
    # A shim exits shortly after containerd deletes its last task: give it that time.
    deadline = time.monotonic() + SHIM_EXIT_TIMEOUT_S
    while shims() and time.monotonic() < deadline:
        time.sleep(0.05)
    if shims():
        leaks.append(f"shims {shims()}")
    mounts = daemon.mounts()
    if mounts:
        leaks.append(f"mounts {mounts}")
    return leaks


@dataclass(frozen=True)
class HostProcess:
    """A process on the host: its pid and start time (together, who it is: pids are
    reused) and its argv."""

    pid: int
    started: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"pid {self.pid}: {' '.join(self.argv)[:300]}"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/pid/stat's fields from the third on (state, ppid, ...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return stat.rsplit(")", 1)[1].split()


def host_process(pid: int) -> HostProcess | None:
    """pid's process, None when it is gone or a zombie (dead, but for its parent's wait)."""
    fields = _stat_fields(pid)
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if fields is None or fields[0] == "Z":
        return None
    argv = tuple(os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0"))
    return HostProcess(pid, int(fields[19]), argv)  # field 22: starttime


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _recorded_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


class VmWatch:
    """What one container's VM has on the host, as seen while it runs: its processes --
    the VMM its backend recorded in the VM's state directory (vmm.pid), everything the
    VMM started (QEMU and its helpers, when the VMM is the vfkit double), and the
    helpers with pid files there (gvproxy, virtiofsd) -- and the mount points under any
    of `mounts_under` (directories where nothing may be mounted on the host).
    `look()` adds what is there now; `watching()` looks in the background, for a
    container that comes and goes within one call (`ctr run --rm`). `alive()`: those
    of its processes still running."""

    def __init__(self, state_dir: Path, mounts_under: tuple[Path, ...] = ()) -> None:
        self.state_dir = state_dir
        self.mounts_under = mounts_under
        self.seen: dict[int, HostProcess] = {}
        self.mounts: set[str] = set()
        self._vmm_pid: int | None = None
        self._lock = threading.Lock()

    def look(self) -> None:
        vmm = _recorded_pid(self.state_dir / PID_FILE_NAME)
        roots = [vmm]
        with contextlib.suppress(OSError):
            roots += [
                _recorded_pid(path)
                for path in self.state_dir.iterdir()
                if path.name == GVPROXY_PID_FILE
                or (path.name.startswith(HELPER_PID_PREFIX) and path.suffix == ".pid")
            ]
        children = _children()
        todo = [pid for pid in roots if pid is not None]
        found = []
        while todo:
            pid = todo.pop()
            process = host_process(pid)
            if process is not None:
                found.append(process)
                todo += children.get(pid, [])
        bases = self.mounts_under
        mounted = [m for m in mount_points() if any(is_under(m, base) for base in bases)]
        with self._lock:
            self.mounts.update(mounted)
            if vmm is not None:
                self._vmm_pid = vmm
            # The latest argv: a VMM may exec (the double's `vfkit` wrapper execs Python).
            self.seen.update((process.pid, process) for process in found)

    @property
    def vmm(self) -> HostProcess | None:
        """The VMM, as its pid file named it while it ran."""
        with self._lock:
            return None if self._vmm_pid is None else self.seen.get(self._vmm_pid)

    def alive(self) -> list[HostProcess]:
        with self._lock:
            seen = list(self.seen.values())
        return [p for p in seen if (now := host_process(p.pid)) and now.started == p.started]

    @contextlib.contextmanager
    def watching(self) -> Iterator[VmWatch]:
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                self.look()
                stop.wait(WATCH_INTERVAL_S)

        watcher = threading.Thread(target=watch, name=f"watch {self.state_dir}", daemon=True)
        watcher.start()
        try:
            yield self
        finally:
            stop.set()
            watcher.join()


def loop_backing_files() -> list[str]:
    """The files the host's loop devices are attached to."""
    files = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            files.append(backing.read_text().strip())
    return files


def vm_leaks(daemon: Containerd, container_id: str, processes: VmWatch) -> list[str]:
    """What one container left, once deleted: its task, container, shim (leaks_of), any
    process of its VM, its VM's state directory (sockets, pid files), rootfs share,
    shim socket and network namespace, any mount naming it or under the daemon's
    directory, any loop device on a file under the daemon's directory."""
    leaks = leaks_of(daemon, container_id)
    leaks += [f"VM process {p}" for p in processes.alive()]
    for what, path in (
        ("VM state directory", paths.vm_state_dir(daemon.namespace, container_id)),
        ("rootfs share", paths.share_dir(daemon.namespace, container_id)),
        ("shim socket", paths.socket_path(daemon.address, daemon.namespace, container_id)),
        ("network namespace", paths.netns_path(daemon.namespace, container_id)),
    ):
        if path.exists():
            leaks.append(f"{what} {path}")
    with open("/proc/self/mountinfo") as mountinfo:
        leaks += [f"mount {line.strip()}" for line in mountinfo if container_id in line]
    base = str(daemon.paths.base)
    leaks += [f"loop device on {f}" for f in loop_backing_files() if f.startswith(base)]
    return leaks
