"""Kernel modules the guest loads when a container needs them, not at boot.

The guest image ships them with a map (`harpoon guest build`: /etc/harpoon/modules.json,
each module -> its file and its dependencies' files, dependencies first); `load` loads
one and what it needs, each once. A name the map lacks is built in or not shipped: the
mount or device wait that needed it then says what is missing.
"""

from __future__ import annotations

import json
import os
from functools import cache

from harpoon import linux
from harpoon.agent.boot import module_name

MODULES_MAP = "/etc/harpoon/modules.json"

#: The filesystem types `load_filesystem` loads modules for: the filesystem's own (named
#: so), after any it uses through the crypto API, which its dependencies do not name.
FILESYSTEM_MODULES: dict[str, tuple[str, ...]] = {
    "erofs": ("erofs",),
    "ext4": ("crc32c_generic", "ext4"),  # metadata checksums
    "overlay": ("overlay",),
    "virtiofs": ("virtiofs",),  # and fuse under it, its dependency
}

#: The filesystems of an erofs rootfs's disks (and the overlay over them).
DISK_FILESYSTEMS = ("erofs", "ext4", "overlay")

#: The driver of virtio-blk disks (harpoon.agent.devices' BLOCK kind).
BLOCK_MODULE = "virtio_blk"


@cache
def _module_map(path: str = MODULES_MAP) -> dict[str, list[str]]:
    try:
        with open(path) as file:
            loaded = json.load(file)
    except FileNotFoundError:
        return {}
    return {str(name): [str(p) for p in paths] for name, paths in loaded.items()}


def load(name: str, module_map: dict[str, list[str]] | None = None, sys_root: str = "/sys") -> None:
    """Loads module `name` and its dependencies unless the kernel has them already."""
    paths = (module_map if module_map is not None else _module_map()).get(name)
    if not paths or os.path.exists(f"{sys_root}/module/{name}"):
        return
    for path in paths:
        if not os.path.exists(f"{sys_root}/module/{module_name(path)}"):
            linux.load_module(path)  # False (not an error) when it was loaded already


def load_filesystem(fstype: str) -> None:
    """The module of a filesystem type, if it is one the guest loads on demand."""
    for name in FILESYSTEM_MODULES.get(fstype, ()):
        load(name)
