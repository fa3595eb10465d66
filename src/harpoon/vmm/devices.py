"""What a VM is made of, as typed devices: shares, disks, NICs and vsock.

A device has two kinds of fields. Its *layout* (a share's tag and how the guest mounts
it, a disk's id and whether it is writable, a NIC's id and backend kind) is what a saved
guest's device state depends on: it goes into the template key. Its *per-instance*
fields (a share's host directory, a disk's backing file, a NIC's MAC, tap name or
socket, a vsock CID) may differ between a template and each VM restored from it; each
class names them in PER_INSTANCE, and `neutral()` replaces them with placeholders, so
that one template serves every container of the same layout. The guest finds each
device by its `id` (a disk by its virtio serial, a NIC by its MAC, set in the guest at
start for a restored VM), never by the order it was probed in.

Backends (harpoon.vmm.qemu_launch, and a vfkit one next) map these onto their own
flags; a backend that cannot provide a device refuses the config with a VMError that
names it. Nothing here may do I/O: the shim builds configs before it loads asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

ShareFs = Literal["9p", "virtiofs"]
NicBackendKind = Literal["tap", "stream"]
# A device id becomes part of QEMU option strings and guest sysfs lookups: keep it plain.
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
MAX_ID_CHARS = 20  # virtio-blk serials hold 20 bytes


class DeviceError(ValueError):
    """A device description that no backend can build (a bad id, a clash)."""


def check_id(kind: str, device_id: str) -> None:
    if not device_id or len(device_id) > MAX_ID_CHARS or not set(device_id) <= _ID_CHARS:
        raise DeviceError(
            f"{kind} id {device_id!r}: use 1 to {MAX_ID_CHARS} of a-z, 0-9, '-' and '_'"
        )


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts by tag."""

    tag: str
    host_path: Path
    fs: ShareFs = "9p"
    read_only: bool = False
    """Served read-only by the host where the backend can (QEMU's 9p and virtiofsd);
    vfkit cannot, and serves it writable: the guest must mount it read-only too."""
    PER_INSTANCE: ClassVar[tuple[str, ...]] = ("host_path",)

    def __post_init__(self) -> None:
        check_id("share", self.tag)

    def neutral(self, index: int) -> Share:
        return replace(self, host_path=Path(f"/share{index}"))


@dataclass(frozen=True)
class Disk:
    """A block device backed by a host file: an erofs layer (read-only) or a writable
    ext4 image. The guest finds it as the virtio-blk disk whose serial is `id`."""

    id: str
    image: Path
    read_only: bool = True
    PER_INSTANCE: ClassVar[tuple[str, ...]] = ("image",)

    def __post_init__(self) -> None:
        check_id("disk", self.id)

    def neutral(self, index: int) -> Disk:
        return replace(self, image=Path(f"/disk{index}"))


@dataclass(frozen=True)
class TapBackend:
    """A tap device the VMM opens by name (in the network namespace it runs in)."""

    ifname: str
    kind: ClassVar[NicBackendKind] = "tap"
    PER_INSTANCE: ClassVar[tuple[str, ...]] = ("ifname",)


@dataclass(frozen=True)
class StreamBackend:
    """Ethernet frames over a unix stream socket another process listens on: gvproxy's
    user-mode network (the host's network, as a process on the host sees it)."""

    socket: Path
    gvproxy: bool = False
    """The VM's launch starts a gvproxy of its own listening at `socket` (which must be
    harpoon.net.gvproxy's for the VM's state directory); else another process does."""
    kind: ClassVar[NicBackendKind] = "stream"
    PER_INSTANCE: ClassVar[tuple[str, ...]] = ("socket",)


NicBackend = TapBackend | StreamBackend


@dataclass(frozen=True)
class NIC:
    """A virtio-net card; the guest finds it by MAC. A restored guest keeps its
    template's (the virtio device's MAC is in the saved state): the MAC is part of the
    layout, and the guest gives the card the address it needs once it runs."""

    id: str
    mac: str
    backend: NicBackend
    PER_INSTANCE: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_id("nic", self.id)
        octets = self.mac.split(":")
        if len(octets) != 6 or not all(len(o) == 2 and _is_hex(o) for o in octets):
            raise DeviceError(f"nic {self.id}: {self.mac!r} is not a MAC like 02:00:00:00:00:01")
        if int(octets[0], 16) & 1:
            raise DeviceError(f"nic {self.id}: {self.mac} is a multicast address")

    def neutral(self, index: int) -> NIC:
        backend: NicBackend = (
            TapBackend(f"tap{index}")
            if isinstance(self.backend, TapBackend)
            else replace(self.backend, socket=Path(f"/nic{index}.sock"))
        )
        return replace(self, backend=backend)


@dataclass(frozen=True)
class Vsock:
    """A virtio-vsock device; its context id is the guest's address on the host."""

    cid: int
    PER_INSTANCE: ClassVar[tuple[str, ...]] = ("cid",)

    def __post_init__(self) -> None:
        if self.cid < 3 or self.cid >= 0xFFFFFFFF:
            raise DeviceError(f"vsock cid {self.cid}: must be 3 or more (0-2 are reserved)")

    def neutral(self, index: int) -> Vsock:
        return replace(self, cid=3 + index)


Device = Share | Disk | NIC | Vsock


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def layout(device: Device | NicBackend) -> dict[str, Any]:
    """The device's fields that a saved guest depends on, as JSON-able data."""
    data: dict[str, Any] = {"type": type(device).__name__}
    for spec in fields(device):
        if spec.name in device.PER_INSTANCE:
            continue
        value = getattr(device, spec.name)
        data[spec.name] = layout(value) if isinstance(value, TapBackend | StreamBackend) else value
    return data


def check_unique(devices: tuple[Device, ...]) -> None:
    """Refuses two devices of one kind with the same id (the guest could not tell them
    apart), or more than one vsock."""
    seen: set[tuple[str, str]] = set()
    for device in devices:
        key = (type(device).__name__, device_id(device))
        if key in seen:
            raise DeviceError(f"two {key[0].lower()} devices are called {key[1]!r}")
        seen.add(key)


def device_id(device: Device) -> str:
    if isinstance(device, Share):
        return device.tag
    if isinstance(device, Vsock):
        return "vsock"
    return device.id
