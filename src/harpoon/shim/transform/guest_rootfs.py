"""A rootfs the guest assembles from disks: the erofs snapshotter's mounts (containerd
>= 2.2, in block mode) as containerd hands them to a runtime that declared it handles
`erofs`, `format/*` and `mkdir/*` itself (harpoon.shim.info):

    ext4 <snapshot>/rwlayer.img [rw loop]            the writable image (mkfs'd by containerd)
    erofs <layer>/layer.erofs [ro loop]              one per layer, top first
    format/mkdir/overlay overlay [X-containerd.mkdir.path={{ mount 0 }}/upper:0755, …,
        workdir={{ mount 0 }}/work, upperdir={{ mount 0 }}/upper,
        lowerdir={{ mount 1 }} | {{ overlay 1 N }}]

Each file becomes a virtio-blk disk (the layers read-only), each disk is mounted in the
guest at MOUNT_ROOT/<index>, the overlay's templates are filled with those guest paths,
and the overlay is mounted at GUEST_ROOT, the container's root. Nothing is mounted on
the host. Pure: parsing and planning; the Rootfs transformer does the work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from harpoon.errdefs import InvalidArgument
from harpoon.vmm.devices import Disk

#: Where the guest mounts the rootfs disks (one directory per containerd mount index).
MOUNT_ROOT = "/run/harpoon/rootfs-disks"
#: The overlay the container's root is.
GUEST_ROOT = "/run/harpoon/rootfs-root"

#: Mount types only the guest can mount (the erofs snapshotter's): a rootfs holding one
#: is assembled in the guest, never on the host.
GUEST_TYPES = ("erofs", "ext4")
GUEST_TYPE_PREFIXES = ("format/", "mkdir/")

#: Options that say how the host would attach a file: a disk needs none of them.
HOST_ONLY_OPTIONS = frozenset({"loop"})

_TEMPLATE = re.compile(r"\{\{\s*(mount|overlay)\s+(\d+)(?:\s+(\d+))?\s*\}\}")


class MountLike(Protocol):
    """containerd.types.Mount's fields read here."""

    @property
    def type(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def options(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class GuestMount:
    """One mount the agent makes, in order."""

    source: str
    target: str
    fstype: str
    options: tuple[str, ...]
    #: The disk whose guest device is `source` (found by its id first), if any.
    disk: str | None = None


@dataclass(frozen=True)
class GuestRootfs:
    """The disks to attach and the guest mounts that make the container's root."""

    disks: tuple[Disk, ...]
    mounts: tuple[GuestMount, ...]
    root: str = GUEST_ROOT


def needs_guest(mounts: Sequence[MountLike]) -> bool:
    """Whether containerd's rootfs mounts must be assembled in the guest."""
    return any(m.type in GUEST_TYPES or m.type.startswith(GUEST_TYPE_PREFIXES) for m in mounts)


def disk_id(index: int) -> str:
    return f"rootfs{index}"


def plan_guest_rootfs(mounts: Sequence[MountLike]) -> GuestRootfs:
    """The disks and guest mounts for containerd's mounts; InvalidArgument, naming the
    mount, for a shape harpoon cannot assemble (multi-device erofs, a bind, …)."""
    if not mounts:
        raise InvalidArgument("no rootfs mounts to assemble in the guest")
    disks: list[Disk] = []
    guest: list[GuestMount] = []
    targets: dict[int, str] = {}
    last = len(mounts) - 1
    for index, mount in enumerate(mounts):
        options = [o for o in mount.options if o not in HOST_ONLY_OPTIONS]
        if mount.type in GUEST_TYPES:
            if any(o.startswith("device=") for o in options):
                raise InvalidArgument(
                    f"rootfs mount {index} ({mount.type} {mount.source}): multi-device erofs "
                    "(the snapshotter's fsmerge) is not supported"
                )
            read_only = "ro" in options or mount.type == "erofs"
            disk = Disk(disk_id(index), Path(mount.source), read_only=read_only)
            disks.append(disk)
            target = f"{MOUNT_ROOT}/{index}"
            targets[index] = target
            options = [o for o in options if not o.startswith("X-containerd.")]
            guest.append(GuestMount("", target, mount.type, tuple(options), disk=disk.id))
            continue
        kind = mount.type
        while kind.startswith(GUEST_TYPE_PREFIXES):
            kind = kind.split("/", 1)[1]
        if index != last or kind != "overlay":
            raise InvalidArgument(
                f"rootfs mount {index} ({mount.type} {mount.source}): harpoon assembles an "
                "erofs rootfs as disks and one overlay on them, last"
            )
        filled = tuple(_fill(option, targets, index) for option in options)
        for option in filled:
            key, _, value = option.partition("=")
            if key in ("upperdir", "workdir") and not value.startswith(f"{MOUNT_ROOT}/"):
                raise InvalidArgument(
                    f"rootfs mount {index} ({mount.type}): its {key} {value} is a host "
                    "directory (the erofs snapshotter in directory mode), which the VM cannot "
                    "reach: configure the snapshotter's block mode (its default_size)"
                )
        guest.append(GuestMount("overlay", GUEST_ROOT, "overlay", filled))
    if guest[-1].target != GUEST_ROOT:
        # A committed view of one layer, or the writable image alone: its mount is the root.
        *rest, top = guest
        guest = [*rest, GuestMount(top.source, GUEST_ROOT, top.fstype, top.options, top.disk)]
    return GuestRootfs(tuple(disks), tuple(guest))


def _fill(option: str, targets: dict[int, str], index: int) -> str:
    def replace(match: re.Match[str]) -> str:
        kind, first = match.group(1), int(match.group(2))
        last = int(match.group(3)) if match.group(3) is not None else first
        if kind == "mount" and match.group(3) is not None:
            raise InvalidArgument(f"rootfs mount {index}: bad template {match.group(0)!r}")
        # containerd's `overlay A B` runs from A to B, either way (lowerdir order).
        step = 1 if last >= first else -1
        indexes = range(first, last + step, step)
        missing = [i for i in indexes if i not in targets]
        if missing:
            raise InvalidArgument(
                f"rootfs mount {index}: {match.group(0)} names mounts {missing}, "
                "which are not disks"
            )
        return ":".join(targets[i] for i in indexes)

    return _TEMPLATE.sub(replace, option)
