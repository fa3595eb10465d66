"""The VM's devices in the guest, found by the id the host gave each one: a virtio-blk
disk by its serial, a virtio-serial port by its name, a network interface by its MAC.

A device may come after the host asked for it (hot-added, or still being probed): a
wait opens a kernel uevent socket (NETLINK_KOBJECT_UEVENT) *before* it looks in sysfs,
so that a device added between the look and the wait is announced on the socket, then
looks again at each uevent of the device's subsystem, until its deadline. No polling:
between uevents the wait sleeps.

What to match is read from sysfs only (a uevent names the device, not its serial or
port name; a port's name even arrives after the port, announced by a `change` uevent).
The /dev nodes are the kernel's own (devtmpfs, made before the uevent is sent): the
guest runs no udev. This module never creates, mounts or configures a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from harpoon.errdefs import DeadlineExceeded, InvalidArgument

SYS_ROOT = "/sys"
DEV_ROOT = "/dev"
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 300.0
NETLINK_KOBJECT_UEVENT = 15  # linux/netlink.h
UEVENT_KERNEL_GROUP = 1  # the kernel's multicast group (udev re-broadcasts on group 2)
UEVENT_BUFFER_BYTES = 1 << 20
MAX_UEVENT_BYTES = 1 << 16

# Device kinds (harpoon.agent.v1.WaitDeviceRequest.Kind, by name).
BLOCK = "block"
VIRTIO_PORT = "virtio-port"
NIC = "nic"


class DeviceKind:
    """Where one kind of device is listed in sysfs, which attribute holds its id, and
    what the caller gets for it: its /dev path, or (a NIC, which has none) its name."""

    __slots__ = ("attribute", "directory", "in_dev", "subsystem")

    def __init__(self, directory: str, attribute: str, subsystem: str, in_dev: bool) -> None:
        self.directory = directory  # under the sysfs root
        self.attribute = attribute
        self.subsystem = subsystem  # a uevent's SUBSYSTEM
        self.in_dev = in_dev


KINDS: dict[str, DeviceKind] = {
    BLOCK: DeviceKind("block", "serial", "block", in_dev=True),
    VIRTIO_PORT: DeviceKind("class/virtio-ports", "name", "virtio-ports", in_dev=True),
    NIC: DeviceKind("class/net", "address", "net", in_dev=False),
}


def _normalized(kind: str, device_id: str) -> str:
    # sysfs writes MACs in lower case; a host may not.
    return device_id.strip().lower() if kind == NIC else device_id.strip()


def find_device(kind: str, device_id: str, sys_root: str = SYS_ROOT) -> str | None:
    """The device of that kind whose id is device_id, if the guest has it now: its /dev
    path, or a network interface's name; None if there is none (yet)."""
    where = KINDS[kind]
    wanted = _normalized(kind, device_id)
    directory = os.path.join(sys_root, where.directory)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None  # no device of that class at all (yet)
    for name in names:
        try:
            with open(os.path.join(directory, name, where.attribute), errors="replace") as f:
                found = f.read()
        except OSError:
            continue  # a device without the attribute, or one going away
        if _normalized(kind, found) != wanted:
            continue
        if not where.in_dev:
            return name
        # sysfs shows a disk a moment before devtmpfs has its node (made before the
        # uevent, which the caller then waits for). A test's sysfs tree has no /dev.
        path = os.path.join(DEV_ROOT, name)
        return path if sys_root != SYS_ROOT or os.path.exists(path) else None
    return None


def parse_uevent(message: bytes) -> dict[str, str]:
    """A kernel uevent ("add@/devices/...\\0ACTION=add\\0SUBSYSTEM=block\\0..."): its
    KEY=value fields; empty for anything else (udev's own "libudev" messages)."""
    header, _, body = message.partition(b"\0")
    if b"@" not in header:
        return {}
    fields: dict[str, str] = {}
    for field in body.split(b"\0"):
        key, sep, value = field.partition(b"=")
        if sep:
            fields[key.decode(errors="replace")] = value.decode(errors="replace")
    return fields


def open_uevent_socket() -> socket.socket:
    """A non-blocking socket on which the kernel announces every device event."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
    )
    try:
        # A burst of uevents (a disk and its partitions) must not overflow it.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UEVENT_BUFFER_BYTES)
        sock.bind((0, UEVENT_KERNEL_GROUP))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def wait_for_device(
    kind: str,
    device_id: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    sys_root: str = SYS_ROOT,
) -> str:
    """find_device, waiting up to timeout_s for the device to appear; DeadlineExceeded,
    naming what was awaited, if it does not."""
    if kind not in KINDS:
        raise InvalidArgument(f"unknown device kind {kind!r}: one of {', '.join(KINDS)}")
    if not device_id.strip():
        raise InvalidArgument(f"a {kind} device must be asked for by its id, not {device_id!r}")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise InvalidArgument(f"a device wait's timeout must be in (0, {MAX_TIMEOUT_S}] s")
    subsystem = KINDS[kind].subsystem
    if kind == BLOCK:
        from harpoon.agent import modules

        modules.load(modules.BLOCK_MODULE)  # its disks appear once their driver is there
    loop = asyncio.get_running_loop()
    with open_uevent_socket() as uevents:  # before the first look: nothing is missed
        try:
            async with asyncio.timeout(timeout_s):
                while (found := find_device(kind, device_id, sys_root)) is None:
                    while True:
                        try:
                            message = await loop.sock_recv(uevents, MAX_UEVENT_BYTES)
                        except OSError:  # ENOBUFS: uevents were lost; look again
                            break
                        if parse_uevent(message).get("SUBSYSTEM") == subsystem:
                            break
        except TimeoutError:
            raise DeadlineExceeded(
                f"no {kind} device with id {device_id!r} appeared in the guest within "
                f"{timeout_s:g} s (is it attached to the VM, with that id?)"
            ) from None
    return found
