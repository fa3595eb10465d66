"""The size of a container's VM, from the OCI spec's linux.resources.

A VM needs memory of its own (kernel, agent, page cache) on top of what the container
may use, so the VM's RAM is the container's memory limit plus GUEST_OVERHEAD_MIB, rounded
up to the next step of a short ladder (256, 384, 512, 768, 1024, 1536 MiB, …: powers of
two and halfway between). The limit itself is the guest cgroup's, exactly as asked: a
container that exceeds it is OOM-killed as under runc. The rounding is for VM templates:
every VM size is a template of its own (built by a cold boot, kept among the few most
recently used), so limits of 150, 200 or 250 MiB share one instead of each costing a
cold boot. RAM a guest does not touch costs the host nothing. CPU quota (or a cpuset)
becomes the vCPU count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harpoon.errdefs import FailedPrecondition

if TYPE_CHECKING:  # vm_size runs before protobuf is loaded (harpoon.shim.prestart)
    from harpoon.api.agent.v1 import agent_pb2

DEFAULT_MEMORY_MIB = 256
GUEST_OVERHEAD_MIB = 128
# Without a CPU limit: two vCPUs (fewer if the host has fewer), as a container under runc
# uses more than one CPU. Under TCG the second one also runs the agent's warm-up
# (harpoon.agent.warm_up) beside the container's start.
DEFAULT_CPUS = 2
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
    resources = spec_resources(spec)
    memory = resources.get("memory") or {}
    limit = memory.get("limit")
    if isinstance(limit, int) and limit > 0:
        memory_mib = memory_step_mib(math.ceil(limit / MIB) + GUEST_OVERHEAD_MIB)
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


def memory_step_mib(needed_mib: int) -> int:
    """The smallest step of the RAM ladder (DEFAULT_MEMORY_MIB times 1, 1.5, 2, 3, 4, 6, …)
    that holds needed_mib."""
    step = DEFAULT_MEMORY_MIB
    while True:
        for size in (step, step + step // 2):
            if size >= needed_mib:
                return size
        step *= 2


def spec_resources(spec: dict[str, Any]) -> dict[str, Any]:
    resources = (spec.get("linux") or {}).get("resources") or {}
    return resources if isinstance(resources, dict) else {}


def check_memory_limit(resources: dict[str, Any], vm_memory_mib: int) -> int:
    """The OCI memory limit in bytes (0 for none), if a VM of vm_memory_mib can give it to
    the container; FailedPrecondition if not: its RAM is fixed when it is created. Pure,
    and loads no protobuf (the daemon plans before it loads any)."""
    limit = (resources.get("memory") or {}).get("limit")
    if not isinstance(limit, int) or limit == 0:
        return 0
    capacity = (vm_memory_mib - GUEST_OVERHEAD_MIB) * MIB
    if limit < 0 or limit > capacity:
        raise FailedPrecondition(
            f"memory limit {limit} exceeds what this container's VM can give it "
            f"({capacity} bytes): a VM's memory is fixed when the container is created"
        )
    return limit


def cgroup_limits(
    resources: dict[str, Any], vm_memory_mib: int
) -> agent_pb2.UpdateResourcesRequest:
    """The guest cgroup limits for OCI LinuxResources (as Create's spec or Update send).

    The VM's RAM was sized at Create and cannot grow: a memory limit above what the VM
    can give the container is refused rather than silently not honoured.
    """
    from harpoon.api.agent.v1 import agent_pb2

    request = agent_pb2.UpdateResourcesRequest()
    limit = check_memory_limit(resources, vm_memory_mib)
    if limit:
        request.memory_limit_bytes = limit
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and quota != 0:
        request.cpu_quota_us = quota
        if isinstance(period, int) and period > 0:
            request.cpu_period_us = period
    pids = (resources.get("pids") or {}).get("limit")
    if isinstance(pids, int) and pids != 0:
        request.pids_limit = pids
    return request
