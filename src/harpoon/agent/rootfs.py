"""Mounts the host asks for in the guest (the rootfs share, and later volumes).

Only the guest's own mounts: the container's (its /proc, /dev, the spec's mounts,
masked and read-only paths) are crun's, inside the container's mount namespace.
"""

from __future__ import annotations

import os

from harpoon import linux


def mount_filesystem(source: str, target: str, fstype: str, options: list[str]) -> None:
    """Mounts source on target, creating the target (a file for a bind of a file)."""
    flags, _, _ = linux.parse_mount_options(options)
    if flags & linux.MS_BIND and os.path.exists(source) and not os.path.isdir(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    else:
        os.makedirs(target, exist_ok=True)
    linux.mount_with_options(source, target, fstype, options)
