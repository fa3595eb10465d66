"""The container's cgroup in the guest: where its processes live, and their usage.

One container per VM, so one group: /sys/fs/cgroup/container, with the cpu, memory,
pids and io controllers enabled. Stats read it into containerd's cgroup v2 Metrics.
"""

from __future__ import annotations

import contextlib
import os

from harpoon import linux
from harpoon.api import names
from harpoon.api.containerd.cgroups.v2 import metrics_pb2

CGROUP_ROOT = "/sys/fs/cgroup"
CONTAINER_GROUP = os.path.join(CGROUP_ROOT, "container")
# The same group as an OCI linux.cgroupsPath (what the host's spec tells crun).
CONTAINER_CGROUPS_PATH = names.CONTAINER_CGROUPS_PATH
CONTROLLERS = ("cpu", "memory", "pids", "io")
_MEMORY_STAT_FIELDS = {f.name for f in metrics_pb2.MemoryStat.DESCRIPTOR.fields}


def ensure_container_group() -> None:
    """Mounts cgroup2 and creates the container's group (idempotent, best effort)."""
    if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        os.makedirs(CGROUP_ROOT, exist_ok=True)
        linux.mount("cgroup2", CGROUP_ROOT, "cgroup2", linux.MS_NOSUID | linux.MS_NODEV)
    for controller in CONTROLLERS:
        with contextlib.suppress(OSError):  # a kernel without it: report without it
            _write(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), f"+{controller}")
    os.makedirs(CONTAINER_GROUP, exist_ok=True)


def container_pids() -> list[int]:
    """Every process in the container's group and the groups below it."""
    pids: list[int] = []
    for directory, _, _ in os.walk(CONTAINER_GROUP):
        with contextlib.suppress(OSError), open(os.path.join(directory, "cgroup.procs")) as procs:
            pids += [int(line) for line in procs if line.strip()]
    return pids


def kill_container_group() -> None:
    """SIGKILLs every process in the container's group (cgroup.kill, Linux 5.14+)."""
    with contextlib.suppress(OSError):
        _write(os.path.join(CONTAINER_GROUP, "cgroup.kill"), "1")


def set_limits(memory_bytes: int, cpu_quota_us: int, cpu_period_us: int, pids: int) -> None:
    """Writes the container group's limits; 0 leaves one alone, -1 lifts it."""

    def value(limit: int) -> str:
        return "max" if limit < 0 else str(limit)

    if memory_bytes:
        _write(os.path.join(CONTAINER_GROUP, "memory.max"), value(memory_bytes))
    if cpu_quota_us:
        period = f" {cpu_period_us}" if cpu_period_us else ""
        _write(os.path.join(CONTAINER_GROUP, "cpu.max"), value(cpu_quota_us) + period)
    if pids:
        _write(os.path.join(CONTAINER_GROUP, "pids.max"), value(pids))


def _write(path: str, value: str) -> None:
    with open(path, "w") as control:
        control.write(value)


def _read(name: str) -> str:
    try:
        with open(os.path.join(CONTAINER_GROUP, name)) as control:
            return control.read()
    except OSError:
        return ""


def _number(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def _pairs(text: str) -> dict[str, int]:
    pairs: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            pairs[key] = int(value)
    return pairs


#: Where the guest's own memory is (a container without a limit can use all of it).
MEMINFO = "/proc/meminfo"


def _memory_limit(text: str) -> int:
    """memory.max in bytes; without a limit ("max"), the VM's memory, which is the real
    ceiling (runc reports 2**64-1 there, and nerdctl stats then shows the *host's*
    memory as the limit: here that would overstate it)."""
    if text.strip() != "max":
        return _number(text)
    try:
        with open(MEMINFO) as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_metrics() -> metrics_pb2.Metrics:
    cpu = _pairs(_read("cpu.stat"))
    memory = _pairs(_read("memory.stat"))
    events = _pairs(_read("memory.events"))
    metrics = metrics_pb2.Metrics(
        pids=metrics_pb2.PidsStat(
            current=_number(_read("pids.current")), limit=_number(_read("pids.max"))
        ),
        cpu=metrics_pb2.CPUStat(
            **{
                k: cpu.get(k, 0)
                for k in (
                    "usage_usec",
                    "user_usec",
                    "system_usec",
                    "nr_periods",
                    "nr_throttled",
                    "throttled_usec",
                )
            }
        ),
        memory=metrics_pb2.MemoryStat(
            **{k: v for k, v in memory.items() if k in _MEMORY_STAT_FIELDS},
            usage=_number(_read("memory.current")),
            usage_limit=_memory_limit(_read("memory.max")),
            max_usage=_number(_read("memory.peak")),
        ),
        memory_events=metrics_pb2.MemoryEvents(
            **{k: events.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill")}
        ),
        # Always there, if empty (a guest whose io.stat lists no device yet): nerdctl
        # stats dereferences it, and a Go client gets nil for a message that is unset.
        io=metrics_pb2.IOStat(),
    )
    for line in _read("io.stat").splitlines():
        device, *fields = line.split()
        major, _, minor = device.partition(":")
        values = dict(field.split("=", 1) for field in fields if "=" in field)
        metrics.io.usage.append(
            metrics_pb2.IOEntry(
                major=int(major),
                minor=int(minor or 0),
                **{k: int(values.get(k, 0)) for k in ("rbytes", "wbytes", "rios", "wios")},
            )
        )
    return metrics
