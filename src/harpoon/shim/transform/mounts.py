"""The spec's mounts: kernel filesystems are crun's to mount in the guest as they are.

Bind mounts of host paths cannot be honoured until host directories are shared into the
VM: Create fails with Unimplemented naming the mount, before any VM starts, instead of
running a container without data it expects.
"""

from __future__ import annotations

from typing import Any

from harpoon.errdefs import Unimplemented
from harpoon.shim.transform.draft import Draft, Transformer

# Mount types that name a kernel filesystem, not a host path (their source is a label).
KERNEL_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm", "bpf",
     "securityfs", "debugfs", "tracefs", "configfs", "fusectl", "hugetlbfs", "ramfs"}
)  # fmt: skip


def is_bind_mount(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in ("bind", "rbind") or "bind" in options or "rbind" in options


def check_mount(mount: dict[str, Any]) -> None:
    if mount.get("type") in KERNEL_FILESYSTEMS and not is_bind_mount(mount):
        return
    raise Unimplemented(
        f"harpoon cannot share host paths into the VM yet: mount of "
        f"{mount.get('source', '')!r} at {mount.get('destination', '')!r} "
        f"(type {mount.get('type', 'none')!r})"
    )


class Mounts(Transformer):
    def plan(self, draft: Draft) -> None:
        for mount in draft.guest_spec.get("mounts") or []:
            check_mount(mount)
