"""Inspecting and cleaning up the host around a test daemon: processes, mounts, sockets.

Everything here reads /proc and acts only on what the caller names (a pid list, a directory
prefix); it never matches processes by name alone, so it cannot hit a daemon or a shim
that belongs to someone else.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: How long killed processes get to disappear.
KILL_TIMEOUT_S = 5.0
#: Poll interval while waiting for processes to go away.
POLL_INTERVAL_S = 0.05

#: Where containerd's runc shim keeps runc's state (its default `--root`, per namespace).
RUNC_ROOT = Path("/run/containerd/runc")

#: Where ctr puts the stdio FIFOs of the tasks it starts (its default `--fifo-dir`).
CTR_FIFO_DIR = Path("/run/containerd/fifo")

_MNT_DETACH = 2


@dataclass(frozen=True)
class ShimProcess:
    """A process found on the host, by its pid and argv: mostly a containerd-shim-*
    serving one of our daemon's tasks (see `binary`), or one of a test's leftovers."""

    pid: int
    argv: tuple[str, ...]

    @property
    def binary(self) -> str:
        return shim_binary(self.argv)

    def flag(self, name: str) -> str | None:
        """The value of a Go-style `-name value` flag in its argv."""
        args = list(self.argv)
        for i, arg in enumerate(args):
            if arg in (f"-{name}", f"--{name}") and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith((f"-{name}=", f"--{name}=")):
                return arg.split("=", 1)[1]
        return None

    def __str__(self) -> str:
        return f"pid {self.pid}: {' '.join(self.argv)}"


def _read_argv(pid: int) -> tuple[str, ...] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone, or a kernel thread's race
        return None
    return tuple(os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0")) if raw else None


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def shim_binary(argv: tuple[str, ...]) -> str:
    """The shim's name from its argv: argv[0], or the script a Python interpreter runs
    (harpoon's shim is `python3 …/containerd-shim-harpoon-v1 -namespace …`)."""
    for arg in argv[:2]:
        name = os.path.basename(arg)
        if name.startswith("containerd-shim-"):
            return name
    return ""


def shim_processes() -> list[ShimProcess]:
    found = []
    for pid in _pids():
        argv = _read_argv(pid)
        if argv and shim_binary(argv):
            found.append(ShimProcess(pid, argv))
    return found


def processes_naming(base: Path) -> list[ShimProcess]:
    """The live processes whose argv or environment names `base` or a path under it (a
    test's private directory: the shims it started, their VMMs, what those started),
    shims or not; a zombie is not one (it is gone but for its parent's wait)."""
    needle = str(base)
    found = []
    for pid in _pids():
        argv = _read_argv(pid)
        if argv is None or not alive(pid):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            environ = []
        values = [*argv, *(os.fsdecode(e).partition("=")[2] for e in environ)]
        if any(value == needle or needle + "/" in value for value in values):
            found.append(ShimProcess(pid, argv))
    return found


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    return children


def _descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _listening_socket_paths(pid: int) -> list[str]:
    """Paths of the unix sockets open in a process (to remove a killed shim's socket)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        table = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return []
    paths = []
    for line in table:
        cols = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; abstract paths start with @.
        if len(cols) >= 8 and cols[6] in inodes and cols[7].startswith("/"):
            paths.append(cols[7])
    return sorted(set(paths))


def kill_process_trees(shims: list[ShimProcess]) -> tuple[list[int], list[str]]:
    """SIGKILLs the shims and everything below them (containers, VMs); removes their
    sockets. Returns the pids killed and the socket files removed."""
    if not shims:
        return [], []
    children = _children_map()
    sockets = sorted({s for shim in shims for s in _listening_socket_paths(shim.pid)})
    pids = sorted({p for shim in shims for p in _descendants(shim.pid, children)})
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(POLL_INTERVAL_S)
    removed = []
    for sock in sockets:
        try:
            os.unlink(sock)
            removed.append(sock)
        except OSError:
            pass
    return pids, removed


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead; its parent (not us) reaps it


def _decode_mount_field(value: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def mount_points() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [_decode_mount_field(line.split()[4]) for line in lines]


def is_under(path: str, base: Path) -> bool:
    return path == str(base) or path.startswith(str(base) + "/")


def unmount_under(base: Path) -> list[str]:
    """Lazily unmounts every mount point under `base`, deepest first."""
    libc = ctypes.CDLL(None, use_errno=True)
    unmounted = []
    # A mount point may be stacked several times; repeat until none is left.
    for _ in range(10):
        points = [m for m in mount_points() if is_under(m, base)]
        if not points:
            break
        for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
            if libc.umount2(os.fsencode(point), _MNT_DETACH) == 0:
                unmounted.append(point)
    return unmounted


def cgroup_mount_points() -> list[str]:
    """Mount points of the cgroup hierarchies (one per v1 controller set, or the v2 root)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Fields after the " - " separator: fstype, source, super options.
        fstype = line.split(" - ", 1)[1].split()[0]
        if fstype in ("cgroup", "cgroup2"):
            points.append(_decode_mount_field(line.split()[4]))
    return points


def remove_cgroups(cgroups_paths: list[str]) -> list[str]:
    """Removes the (empty) cgroups at these OCI `linux.cgroupsPath`s in every hierarchy.

    A runtime whose shim was killed never removes its container's cgroup. rmdir only
    succeeds on a cgroup without processes or children, so a live one is never touched.
    systemd-style paths (`slice:prefix:name`) are skipped.
    """
    removed = []
    for cgroups_path in cgroups_paths:
        if ":" in cgroups_path or not cgroups_path.strip("/"):
            continue
        for hierarchy in cgroup_mount_points():
            path = Path(hierarchy) / cgroups_path.strip("/")
            with contextlib.suppress(OSError):
                path.rmdir()
                removed.append(str(path))
    return removed


def delete_runc_containers_under(base: Path) -> list[str]:
    """Force-deletes the runc containers whose bundle is under `base`; returns their IDs.

    The runc shim keeps runc's state in the machine-wide RUNC_ROOT/<namespace>, outside
    the daemon's directory; when the shim is killed that state (and the cgroup) remains,
    and a later container with the same ID fails with "container with given ID already
    exists". Only containers of our own bundles are touched.
    """
    runc = shutil.which("runc") or shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if runc is None or not RUNC_ROOT.is_dir():
        return []
    deleted = []
    for root in sorted(p for p in RUNC_ROOT.iterdir() if p.is_dir()):
        listed = subprocess.run(
            [runc, "--root", str(root), "list", "--format", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if listed.returncode != 0:
            continue
        for container in json.loads(listed.stdout or "null") or []:
            if is_under(str(container.get("bundle", "")), base):
                delete = [runc, "--root", str(root), "delete", "--force", container["id"]]
                if subprocess.run(delete, capture_output=True, check=False).returncode == 0:
                    deleted.append(str(container["id"]))
    return deleted


def remove_ctr_fifos(container_ids: list[str]) -> list[str]:
    """Removes the stdio FIFO directories `ctr run -d` left for these containers.

    ctr creates CTR_FIFO_DIR/<random>/<id>-{stdin,stdout,stderr} and only removes them
    when it deletes the task itself; a task that was never deleted leaves them. A
    directory is removed only if every entry belongs to one of the given containers.
    """
    if not container_ids or not CTR_FIFO_DIR.is_dir():
        return []
    prefixes = tuple(f"{cid}-" for cid in container_ids)
    removed = []
    for directory in CTR_FIFO_DIR.iterdir():
        with contextlib.suppress(OSError):
            entries = os.listdir(directory)
            if entries and all(e.startswith(prefixes) for e in entries):
                shutil.rmtree(directory)
                removed.append(str(directory))
    return removed
