"""The container's root filesystem in the guest, through a share that exists before it.

QEMU's 9p server opens its export when it starts, so a directory mounted on the export
later is invisible to the guest. A VM that starts before its container's rootfs exists
(harpoon starts the VM while containerd is still sending Create) therefore exports an
empty directory of its own, `<share>/`, holding one mount point, `<share>/rootfs`: the
shim bind-mounts the container's rootfs there when it has it. The guest mounted the
share at GUEST_SHARE as soon as it was up, and the container's root is GUEST_ROOTFS,
the mount point seen through the share: 9p resolves names through the host's mounts
(and this share caches no names: NINEP_OPTIONS), so from then on the guest sees the
rootfs there, not the empty directory under it; no mount in the guest is needed.

The share directory is removed only once nothing is mounted under it (what is left then
is what the guest may have written into the export), so no recursive removal can ever
reach into a rootfs still mounted there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from harpoon import private

if TYPE_CHECKING:
    from collections.abc import Iterable

    from harpoon.sandbox.agent_client import AgentClient
    from harpoon.vmm.devices import Share, ShareFs

SHARE_TAG = "rootfs"
ROOTFS_NAME = "rootfs"
GUEST_SHARE = "/run/harpoon/share"
GUEST_ROOTFS = f"{GUEST_SHARE}/{ROOTFS_NAME}"
MOUNTINFO = "/proc/self/mountinfo"
# cache=mmap: the page cache serves mmap (nothing else is cached, so the guest sees the
# host's changes as with cache=none). Without it a MAP_SHARED writable mapping of a
# rootfs file fails with EINVAL (sqlite's WAL, LMDB), and the share has no readahead:
# every page an exec faults in was a 4 KiB read of its own (83 reads, ~50 ms under
# TCG, to exec busybox; 7 with it).
NINEP_OPTIONS = ["trans=virtio", "version=9p2000.L", "msize=524288", "cache=mmap"]


def prepare(share: Path) -> None:
    """Creates the (empty) export and its mount point; before the VM starts. What a
    killed shim of a container of the same name left there goes first, but an export
    exactly as this makes it is kept: the VM may already be exporting it (a shim
    launches its VM before the sandbox that runs it starts), and QEMU holds the
    directory it opened at launch, not the path."""
    if _is_prepared(share):
        return
    if os.path.lexists(share):
        release(share)
    # Root's alone, as everything of harpoon's on the host: the directory of every
    # container's share (it lists them) and the export (it holds the container's
    # rootfs). QEMU reads the export as root, and the guest checks the modes it shows
    # itself: the container's root is the rootfs mounted under them, never these.
    private.directory(share.parent)
    private.directory(share)
    (share / ROOTFS_NAME).mkdir(mode=0o755, exist_ok=True)


def attach(share: Path, rootfs: Path) -> None:
    """Bind-mounts the container's rootfs (with what is mounted under it) into the export."""
    from harpoon import linux

    target = share / ROOTFS_NAME
    # The guest can write to the export: mount on our directory, never through a link.
    if not stat.S_ISDIR(os.lstat(target).st_mode):
        raise OSError(errno.ENOTDIR, f"{target} is no longer the directory it was")
    linux.mount(str(rootfs), str(target), "", linux.MS_BIND | linux.MS_REC)


def release(share: Path) -> None:
    """Unmounts the rootfs from the export and removes the export; idempotent. Raises
    (and removes nothing) if something stays mounted there."""
    if _mounted_under(share):
        from harpoon import linux

        linux.unmount_all(str(share))
        if _mounted_under(share):
            raise OSError(errno.EBUSY, f"{share} is still mounted: not removing it")
    try:
        for directory in (share / ROOTFS_NAME, share):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(directory)
    except OSError:  # not empty: the guest wrote into its export
        import shutil

        shutil.rmtree(share, ignore_errors=True)


def _is_prepared(share: Path) -> bool:
    """Whether share is a directory holding only an empty mount point, mounted nowhere."""
    try:
        return (
            stat.S_ISDIR(os.lstat(share).st_mode)
            and os.listdir(share) == [ROOTFS_NAME]
            and stat.S_ISDIR(os.lstat(share / ROOTFS_NAME).st_mode)
            and not os.listdir(share / ROOTFS_NAME)
            and not _mounted_under(share)
        )
    except OSError:
        return False


def _mounted_under(path: Path) -> bool:
    """Whether anything is mounted at or below path (without loading libc)."""
    from harpoon import linux

    if not linux.HAS_BIND_MOUNTS:
        # macOS: harpoon mounts nothing there (binds are shares of their own:
        # harpoon.sandbox.bind_shares), and there is no mountinfo to read.
        return False
    prefix = os.fsencode(path)
    try:
        with open(MOUNTINFO, "rb") as mountinfo:
            for line in mountinfo:
                point = line.split(b" ", 5)[4]
                if point == prefix or point.startswith(prefix + b"/"):
                    return True
    except OSError:
        return True  # cannot tell: let unmount_all look
    return False


def share_fs(shares: Iterable[Share]) -> ShareFs:
    """How the VM serves its rootfs share (9p when it has none)."""
    for share in shares:
        if share.tag == SHARE_TAG:
            return share.fs
    return "9p"


async def mount_share(agent: AgentClient, fs: ShareFs = "9p") -> None:
    """Mounts the export in the guest (once, as soon as the guest is up), as the VM
    serves it: 9p, or virtiofs (which caches nothing either: harpoon.vmm.virtiofsd)."""
    options = NINEP_OPTIONS if fs == "9p" else []
    await agent.mount(SHARE_TAG, GUEST_SHARE, fs, options)
