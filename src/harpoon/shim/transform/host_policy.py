"""What in config.json belongs to the host and is not taken into the guest.

- `hooks` are host programs (nerdctl's OCI hook, for one): not run in the guest.
- AppArmor profiles and SELinux labels are host policy the guest kernel does not load.
- Namespaces given by `path` (a host's /proc/<pid>/ns/* or a CNI netns file) do not
  exist in the guest: the container gets new ones of the same types.
- Block-IO limits per device and hugepage / RDMA limits name host devices and
  controllers; the guest has its own virtio disks, so they are dropped.
- Without a hostname, a runc container in a new UTS namespace keeps the host's name
  (the namespace starts as a copy); harpoon's gets the host's name too, not the guest's.
"""

from __future__ import annotations

from typing import Any

from harpoon.shim.transform.draft import Draft, Transformer

_HOST_POLICY_PROCESS_KEYS = ("apparmorProfile", "selinuxLabel")
_HOST_ONLY_LINUX_KEYS = ("mountLabel",)
_HOST_DEVICE_BLOCKIO_KEYS = (
    "weightDevice",
    "throttleReadBpsDevice",
    "throttleWriteBpsDevice",
    "throttleReadIOPSDevice",
    "throttleWriteIOPSDevice",
)
_HOST_ONLY_RESOURCE_KEYS = ("hugepageLimits", "rdma")


def process_for_guest(process: dict[str, Any]) -> dict[str, Any]:
    """An OCI process (the init's, or an exec's) without host-only policy."""
    guest = dict(process)
    for key in _HOST_POLICY_PROCESS_KEYS:
        guest.pop(key, None)
    return guest


class HostPolicy(Transformer):
    def plan(self, draft: Draft) -> None:
        guest = draft.guest_spec
        guest.pop("hooks", None)
        guest["process"] = process_for_guest(guest.get("process") or {})
        linux = guest.get("linux")
        if not isinstance(linux, dict):
            return
        for key in _HOST_ONLY_LINUX_KEYS:
            linux.pop(key, None)
        namespaces = linux.get("namespaces") or []
        linux["namespaces"] = [{"type": ns["type"]} for ns in namespaces if "type" in ns]
        resources = linux.get("resources")
        if isinstance(resources, dict):
            for key in _HOST_ONLY_RESOURCE_KEYS:
                resources.pop(key, None)
            block_io = resources.get("blockIO")
            if isinstance(block_io, dict):
                for key in _HOST_DEVICE_BLOCKIO_KEYS:
                    block_io.pop(key, None)
        has_uts = any(ns["type"] == "uts" for ns in linux["namespaces"])
        if has_uts and not guest.get("hostname"):
            guest["hostname"] = draft.host_hostname
