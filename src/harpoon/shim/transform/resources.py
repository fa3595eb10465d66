"""The container's resources: the VM's size, from the spec's limits.

The VM gets vCPUs from the CPU quota and RAM for the memory limit plus the guest's
overhead (harpoon.shim.resources.vm_size). The limits themselves are in the guest's
spec, and crun sets them on the container's cgroup in the guest, exactly: they are not
sent a second time. A limit the VM could never give is refused here, before any VM.
"""

from __future__ import annotations

from harpoon.shim.resources import check_memory_limit, spec_resources, vm_size
from harpoon.shim.transform.draft import Draft, Transformer


class Resources(Transformer):
    def plan(self, draft: Draft) -> None:
        size = vm_size(draft.spec)
        draft.cpus, draft.memory_mib = size.cpus, size.memory_mib
        check_memory_limit(spec_resources(draft.spec), size.memory_mib)
