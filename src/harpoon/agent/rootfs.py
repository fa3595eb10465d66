"""Mounts the host asks for in the guest (the rootfs share, and later volumes).

Only the guest's own mounts: the container's (its /proc, /dev, the spec's mounts,
masked and read-only paths) are crun's, inside the container's mount namespace.
"""

from __future__ import annotations

import os

from harpoon import linux

# What the guest image ships beside its boot modules: each on-demand module's files,
# dependencies first (harpoon.guest.build writes it).
MODULES_MAP_PATH = "/etc/harpoon/modules.json"
# A filesystem whose module is not a boot module: loaded at its first mount.
FILESYSTEM_MODULES = {"virtiofs": "virtiofs"}


def mount_filesystem(source: str, target: str, fstype: str, options: list[str]) -> None:
    """Mounts source on target, creating the target (a file for a bind of a file)."""
    flags, _, _ = linux.parse_mount_options(options)
    if flags & linux.MS_BIND and os.path.exists(source) and not os.path.isdir(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    else:
        os.makedirs(target, exist_ok=True)
    module = FILESYSTEM_MODULES.get(fstype)
    if module is not None:
        load_on_demand(module)
    linux.mount_with_options(source, target, fstype, options)


def load_on_demand(name: str, modules_map: str = MODULES_MAP_PATH) -> None:
    """Loads the shipped module `name` and what it needs (loaded ones are skipped); a
    module the image does not ship is left to the mount's own error (built in, or
    missing: ENODEV then names the filesystem)."""
    import json

    try:
        with open(modules_map) as listing:
            paths = json.load(listing).get(name, [])
    except (OSError, ValueError):
        return
    for path in paths:
        linux.load_module(path)
