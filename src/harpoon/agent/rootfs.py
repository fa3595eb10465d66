"""Prepares a container's root inside the guest: the share mounted, /sys, /dev.

/proc is mounted by the container's init itself, from inside its PID namespace.

Kept deliberately small: full OCI mount and device semantics will come from running
the container through crun in the guest; until then a chroot gets the mounts every
program expects.
"""

from __future__ import annotations

import contextlib
import os

from harpoon import linux

# (source, fstype, target inside the root, flags, data)
_BASE_MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    (
        "sysfs", "sysfs", "sys",
        linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY, "",
    ),
    ("devtmpfs", "devtmpfs", "dev", linux.MS_NOSUID, "mode=755"),
    # The guest's own devpts, not a new instance: the agent opens terminals there, and
    # a process must find its terminal under /dev/pts (tty(1), ttyname(3)).
    ("/dev/pts", "", "dev/pts", linux.MS_BIND, ""),
    ("tmpfs", "tmpfs", "dev/shm", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
)  # fmt: skip


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


def prepare_root(root: str) -> None:
    """Mounts the filesystems every process expects under root (idempotent)."""
    mounted = set(linux.mounts_under(root))
    with contextlib.suppress(OSError):  # the init mounts its /proc here when it starts
        os.makedirs(os.path.join(root, "proc"), exist_ok=True)
    for source, fstype, relative, flags, data in _BASE_MOUNTS:
        target = os.path.join(root, relative)
        if target in mounted:
            continue
        try:
            os.makedirs(target, exist_ok=True)
        except OSError:
            continue  # a read-only root without the directory: do without it
        linux.mount(source, target, fstype, flags, data)
