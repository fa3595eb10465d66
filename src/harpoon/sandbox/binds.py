"""Host paths bind-mounted into the container (`-v DIR:/app`, nerdctl's /etc files,
named volumes), through the VM's one share.

The share's export (harpoon.sandbox.rootfs) holds the rootfs's mount point; at Create
it gets a `mounts/` directory beside it with one mount point per host bind: an empty
directory for a directory, an empty file for a file, each with the host path
bind-mounted on it. The guest sees `mounts/<n>` through the share at once (9p resolves
names through the host's mounts, and the share caches no names), and crun bind-mounts
it into the container as the spec says, options and all. So:

- a single file is shared as that file alone, never with its siblings;
- what the host writes to a bound file or directory later is what the guest reads
  next (the share caches no data but mmap's pages): nerdctl's rewrites of /etc/hosts;
- the VM is the same with or without binds, so it still starts from a template;
- `ro` holds on both sides: the host's bind is read-only too, so not even the guest's
  kernel can write through it.

The mount points go with the share (rootfs.release unmounts everything under it).

This is the way of a host that can bind mount (Linux, where it keeps templates: the VM
does not depend on the binds). A host that cannot (macOS) shares each bind's directory
as a device of its own instead: harpoon.sandbox.bind_shares.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from harpoon.sandbox.rootfs import GUEST_SHARE

MOUNTS_NAME = "mounts"
GUEST_MOUNTS = f"{GUEST_SHARE}/{MOUNTS_NAME}"


@dataclass(frozen=True)
class HostBind:
    """One host path, bound at `mounts/<index>` of the share."""

    index: int
    source: Path
    directory: bool
    readonly: bool
    recursive: bool

    @property
    def guest_path(self) -> str:
        """Where the guest sees it (the source of crun's bind mount)."""
        return f"{GUEST_MOUNTS}/{self.index}"


def attach(share: Path, binds: tuple[HostBind, ...] | list[HostBind]) -> None:
    """Makes each bind's mount point under the share's `mounts/` and binds its source
    there; a failure leaves what was done for rootfs.release to undo."""
    if not binds:
        return
    from harpoon import linux

    mounts = share / MOUNTS_NAME
    os.mkdir(mounts, 0o700)  # not exist_ok: a directory already there is not ours
    for bind in binds:
        point = mounts / str(bind.index)
        if bind.directory:
            os.mkdir(point, 0o700)
        else:
            os.close(os.open(point, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY, 0o600))
        # Checked again at the last moment: the source must still be what was planned.
        kind = os.stat(bind.source).st_mode
        if stat.S_ISDIR(kind) != bind.directory:
            expected = "a directory" if bind.directory else "a file"
            raise OSError(errno.EINVAL, f"bind mount source {bind.source} is no longer {expected}")
        flags = linux.MS_BIND | (linux.MS_REC if bind.recursive else 0)
        linux.mount(str(bind.source), str(point), "", flags)
        if bind.readonly:
            linux.mount("", str(point), "", linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY)
