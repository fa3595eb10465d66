"""The container's OCI spec as it must run inside its VM (by crun, in the guest).

containerd writes config.json for a runtime on this host; inside the VM some of it
means nothing or something else. Pure functions, so the rules are tested without a VM:

- `root.path` becomes the guest path where the rootfs share is mounted.
- Namespaces given by `path` (a host's /proc/<pid>/ns/* or a CNI netns file) do not
  exist in the guest: the container gets new ones of the same types.
- `hooks` are host programs (nerdctl's OCI hook, for one): not run in the guest.
- AppArmor profiles and SELinux labels are host policy the guest kernel does not load.
- Block-IO limits per device and hugepage / RDMA limits name host devices and
  controllers; the guest has its own virtio disks, so they are dropped.
- Bind mounts of host paths cannot be honoured until host directories are shared into
  the VM: Create fails with Unimplemented saying which mount, instead of running a
  container without data it expects.
- Without a hostname, a runc container in a new UTS namespace keeps the host's name
  (the namespace starts as a copy); harpoon's gets the host's name too, not the guest's.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from harpoon.errdefs import Unimplemented

# Mount types that name a kernel filesystem, not a host path (their source is a label).
_KERNEL_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm", "bpf",
     "securityfs", "debugfs", "tracefs", "configfs", "fusectl", "hugetlbfs", "ramfs"}
)  # fmt: skip
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


def is_bind_mount(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in ("bind", "rbind") or "bind" in options or "rbind" in options


def _check_mount(mount: dict[str, Any]) -> None:
    if mount.get("type") in _KERNEL_FILESYSTEMS and not is_bind_mount(mount):
        return
    raise Unimplemented(
        f"harpoon cannot share host paths into the VM yet: mount of "
        f"{mount.get('source', '')!r} at {mount.get('destination', '')!r} "
        f"(type {mount.get('type', 'none')!r})"
    )


def process_for_guest(process: dict[str, Any]) -> dict[str, Any]:
    """An OCI process (the init's, or an exec's) without host-only policy."""
    guest = dict(process)
    for key in _HOST_POLICY_PROCESS_KEYS:
        guest.pop(key, None)
    return guest


def spec_for_guest(spec: dict[str, Any], *, guest_root: str, host_hostname: str) -> dict[str, Any]:
    """The whole config.json as crun runs it in the guest (the input is not changed)."""
    guest = copy.deepcopy(spec)
    guest.pop("hooks", None)
    guest["root"] = {**(spec.get("root") or {}), "path": guest_root}
    guest["process"] = process_for_guest(spec.get("process") or {})
    for mount in guest.get("mounts") or []:
        _check_mount(mount)
    linux = guest.get("linux")
    if isinstance(linux, dict):
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
            guest["hostname"] = host_hostname
    return guest


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
