"""Mounts the host asks for in the guest (the rootfs share, and later volumes).

Only the guest's own mounts: the container's (its /proc, /dev, the spec's mounts,
masked and read-only paths) are crun's, inside the container's mount namespace.
"""

from __future__ import annotations

import os

from harpoon import linux

#: containerd's mkdir transform, as the erofs snapshotter's overlay description carries
#: it (`X-containerd.mkdir.path=DIR:MODE[:UID:GID]`): DIR is made before the mount.
MKDIR_OPTION = "X-containerd.mkdir.path="


def split_mkdirs(options: list[str]) -> tuple[list[tuple[str, int, int, int]], list[str]]:
    """(the directories to make first: path, mode, uid, gid; the mount's own options)."""
    mkdirs, rest = [], []
    for option in options:
        if not option.startswith(MKDIR_OPTION):
            rest.append(option)
            continue
        path, *fields = option.removeprefix(MKDIR_OPTION).split(":")
        mode = int(fields[0], 8) if fields and fields[0] else 0o755
        uid, gid = (int(fields[1]), int(fields[2])) if len(fields) >= 3 else (-1, -1)
        mkdirs.append((path, mode, uid, gid))
    return mkdirs, rest


def mount_filesystem(source: str, target: str, fstype: str, options: list[str]) -> None:
    """Mounts source on target, creating the target (a file for a bind of a file), and
    first the directories an `X-containerd.mkdir.path` option names; loads the module of
    a filesystem the guest loads on demand (erofs, ext4, overlay, virtiofs)."""
    from harpoon.agent import modules

    mkdirs, options = split_mkdirs(options)
    for path, mode, uid, gid in mkdirs:
        if not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, mode)
            if uid >= 0:
                os.chown(path, uid, gid)
    modules.load_filesystem(fstype)
    flags, _, _ = linux.parse_mount_options(options)
    if flags & linux.MS_BIND and os.path.exists(source) and not os.path.isdir(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    else:
        os.makedirs(target, exist_ok=True)
    linux.mount_with_options(source, target, fstype, options)
