"""The size of a container's VM, from the OCI spec's linux.resources.

A VM needs memory of its own (kernel, agent, page cache) on top of what the container
may use, so the container's memory limit plus GUEST_OVERHEAD_MIB becomes the VM's RAM:
a container that exceeds its limit meets the guest's OOM killer, as under runc it
meets its cgroup's. CPU quota (or a cpuset) becomes the vCPU count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

DEFAULT_MEMORY_MIB = 256
GUEST_OVERHEAD_MIB = 128
MIN_MEMORY_MIB = 128
DEFAULT_CPUS = 1
MIB = 1 << 20


@dataclass(frozen=True)
class VMSize:
    cpus: int
    memory_mib: int


def _cpuset_count(cpus: str) -> int:
    count = 0
    for part in cpus.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last) - int(first) + 1 if last else 1
    return count


def vm_size(spec: dict[str, Any], host_cpus: int | None = None) -> VMSize:
    """The vCPUs and RAM for a container with this OCI spec."""
    resources = (spec.get("linux") or {}).get("resources") or {}
    memory = resources.get("memory") or {}
    limit = memory.get("limit")
    if isinstance(limit, int) and limit > 0:
        memory_mib = max(MIN_MEMORY_MIB, math.ceil(limit / MIB) + GUEST_OVERHEAD_MIB)
    else:
        memory_mib = DEFAULT_MEMORY_MIB
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    cpus = DEFAULT_CPUS
    if isinstance(quota, int) and isinstance(period, int) and quota > 0 and period > 0:
        cpus = math.ceil(quota / period)
    elif isinstance(cpu.get("cpus"), str) and cpu["cpus"]:
        cpus = _cpuset_count(cpu["cpus"])
    cpus = max(1, min(cpus, host_cpus or os.cpu_count() or 1))
    return VMSize(cpus=cpus, memory_mib=memory_mib)
