"""The container's processes as `ps` in the container shows them, read from the guest's
/proc: what `harpoon top` prints (the host's ps sees only the VM's QEMU).

Pids are the container's own (the last NSpid of /proc/PID/status), so its init is 1,
as `docker top` users see inside a container; a parent outside the container's pid
namespace is 0. User names come from the container's own /etc/passwd (through
/proc/PID/root), not the guest's. Parsing is separate from reading, for the tests.
"""

from __future__ import annotations

import contextlib
import os

from harpoon.agent import cgroups
from harpoon.api.agent.v1 import agent_pb2

PROC = "/proc"


class Stat:
    """The fields of /proc/PID/stat that ps shows. (A plain class: the guest ships no
    `dataclasses`, whose import costs the agent tens of ms under TCG.)"""

    __slots__ = ("comm", "cpu_ticks", "ppid", "start_ticks", "tty_nr")

    def __init__(self, comm: str, ppid: int, tty_nr: int, cpu_ticks: int, start_ticks: int):
        self.comm = comm
        self.ppid = ppid
        self.tty_nr = tty_nr
        self.cpu_ticks = cpu_ticks  # utime + stime
        self.start_ticks = start_ticks


def parse_stat(text: str) -> Stat:
    """/proc/PID/stat: `pid (comm) state ppid …`; comm may hold spaces and parentheses,
    so the fields after it are counted from its last ')'."""
    open_paren, close_paren = text.index("("), text.rindex(")")
    fields = text[close_paren + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid 4, tty_nr 7, utime 14, stime 15,
    # starttime 22.
    return Stat(
        comm=text[open_paren + 1 : close_paren],
        ppid=int(fields[1]),
        tty_nr=int(fields[4]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        start_ticks=int(fields[19]),
    )


def parse_status(text: str) -> tuple[list[int], int]:
    """/proc/PID/status: the pid in each nested namespace (outermost first) and the
    real uid."""
    nspids: list[int] = []
    uid = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "NSpid":
            nspids = [int(n) for n in value.split()]
        elif key == "Uid":
            uid = int(value.split()[0])
    return nspids, uid


def parse_passwd(text: str) -> dict[int, str]:
    """uid → name from an /etc/passwd (the first name of a uid wins, as getpwuid's)."""
    names: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            names.setdefault(int(parts[2]), parts[0])
    return names


class _Seen:
    __slots__ = ("args", "names", "nspids", "pid", "stat", "uid")

    def __init__(
        self,
        pid: int,
        nspids: list[int],
        uid: int,
        stat: Stat,
        args: list[str],
        names: dict[int, str],
    ) -> None:
        self.pid, self.nspids, self.uid = pid, nspids, uid
        self.stat, self.args, self.names = stat, args, names


def _read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def _look(pid: int, passwd_cache: dict[str, dict[int, str]]) -> _Seen | None:
    """What /proc says of pid; None if it is gone meanwhile."""
    base = os.path.join(PROC, str(pid))
    try:
        stat = parse_stat(_read(os.path.join(base, "stat")).decode(errors="replace"))
        nspids, uid = parse_status(_read(os.path.join(base, "status")).decode(errors="replace"))
        raw_args = _read(os.path.join(base, "cmdline"))
    except (OSError, ValueError, IndexError):
        return None
    args = [a.decode(errors="replace") for a in raw_args.split(b"\0")[:-1]] if raw_args else []
    try:
        root = os.readlink(os.path.join(base, "root"))
    except OSError:
        root = ""
    if root not in passwd_cache:
        passwd_cache[root] = {}
        with contextlib.suppress(OSError):
            text = _read(os.path.join(base, "root", "etc", "passwd")).decode(errors="replace")
            passwd_cache[root] = parse_passwd(text)
    return _Seen(pid, nspids or [pid], uid, stat, args, passwd_cache[root])


def processes(pids: list[int]) -> list[agent_pb2.GuestProcess]:
    """The GuestProcess of each pid still there, pids as the container sees them
    (sorted)."""
    passwd_cache: dict[str, dict[int, str]] = {}
    seen = [s for s in (_look(pid, passwd_cache) for pid in sorted(set(pids))) if s]
    # A parent's pid in the container's namespace: known when the parent is one of
    # the container's processes, else outside it (0).
    inner = {s.pid: s.nspids[-1] for s in seen}
    listed = [
        agent_pb2.GuestProcess(
            pid=s.nspids[-1], ppid=inner.get(s.stat.ppid, 0), uid=s.uid,
            user=s.names.get(s.uid, ""), start_ticks=s.stat.start_ticks,
            cpu_ticks=s.stat.cpu_ticks, tty_nr=s.stat.tty_nr, args=s.args, comm=s.stat.comm,
        )
        for s in seen
    ]  # fmt: skip
    return sorted(listed, key=lambda p: p.pid)


def uptime_ticks(ticks_per_second: int) -> int:
    with open(os.path.join(PROC, "uptime")) as stream:
        return int(float(stream.read().split()[0]) * ticks_per_second)


def list_processes() -> agent_pb2.ListProcessesResponse:
    """The container's processes (its cgroup's) and the guest's clock for reading them."""
    hz = os.sysconf("SC_CLK_TCK")
    return agent_pb2.ListProcessesResponse(
        processes=processes(cgroups.container_pids()),
        uptime_ticks=uptime_ticks(hz),
        ticks_per_second=hz,
    )
