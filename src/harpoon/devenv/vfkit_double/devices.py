"""vfkit's `--device TYPE,key=value,...` options, parsed into typed devices (sans-IO).

Each function follows one `FromOptions` of vfkit pkg/config/virtio.go (v0.6.x): the
same keys, the same defaults, the same refusals with vfkit's own words. Where real
vfkit accepts more than the double can run (a NAT network, a pty console, the devices
harpoon never asks for), the double refuses with `Unsupported`, naming the device.

A device string is split on every comma with no quoting (vfkit's deviceFromCmdLine uses
strings.Split; only --bootloader honours quotes), and empty items are skipped
(strvToOptions). Checks that need the file system (a disk image's header, a shared
directory's existence) are vfkit's too, but they live in harpoon.devenv.vfkit_double.checks.

`inspect_json` renders a device as vfkit's `GET /vm/inspect` does (pkg/config/json.go:
a "kind" and the struct's JSON fields).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The largest vsock port (vfkit parses it with strconv.ParseUint(value, 10, 32)).
MAX_VSOCK_PORT = 2**32 - 1


class DeviceError(ValueError):
    """A device option vfkit itself refuses; the message is vfkit's."""


class Unsupported(DeviceError):
    """Something real vfkit accepts but this test double does not implement."""


@dataclass(frozen=True)
class VirtioSerial:
    """A console whose guest output goes to `log_file` (the guest's hvc0)."""

    log_file: str


@dataclass(frozen=True)
class VirtioVsock:
    """One vsock port exposed on the host as the unix socket `socket_url`: `listen`
    is guest->host (vfkit dials socket_url), otherwise host->guest (vfkit listens on it)."""

    port: int
    socket_url: str
    listen: bool


@dataclass(frozen=True)
class VirtioFs:
    """A host directory the guest mounts by tag; always read-write (vfkit has no
    read-only option: pkg/vf/virtio.go calls vz.NewSharedDirectory(dir, false))."""

    shared_dir: str
    mount_tag: str

    @property
    def tag(self) -> str:
        """The tag the guest sees: the directory's base name when none is given
        (pkg/vf/virtio.go VirtioFs.toVz)."""
        return self.mount_tag or self.shared_dir.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class VirtioBlk:
    """A raw disk image; `device_id` becomes its virtio serial (VZ's blockDeviceIdentifier)."""

    path: str
    device_id: str = ""
    read_only: bool = False


@dataclass(frozen=True)
class VirtioNet:
    """A NIC on a unixgram socket (`unix_socket_path`, vfkit connects to it) or on a
    connected datagram socket inherited as `fd`."""

    unix_socket_path: str = ""
    fd: int | None = None
    mac: str = ""
    vfkit_magic: bool = False


@dataclass(frozen=True)
class VirtioRng:
    """An entropy source for the guest."""


Device = VirtioSerial | VirtioVsock | VirtioFs | VirtioBlk | VirtioNet | VirtioRng

Option = tuple[str, str]

#: Device types real vfkit knows (pkg/config/virtio.go deviceFromCmdLine) that the double
#: does not run: harpoon never asks for them.
UNSUPPORTED_TYPES = frozenset(
    {"rosetta", "nvme", "usb-mass-storage", "virtio-input", "virtio-gpu", "virtio-balloon", "nbd"}
)


def parse_device(spec: str) -> Device:
    """One `--device` value, as vfkit's deviceFromCmdLine parses it."""
    kind, *rest = spec.split(",")
    options = [_option(item) for item in rest if item]
    parsers: dict[str, Callable[[list[Option]], Device]] = {
        "virtio-serial": _serial,
        "virtio-vsock": _vsock,
        "virtio-fs": _fs,
        "virtio-blk": _blk,
        "virtio-net": _net,
        "virtio-rng": _rng,
    }
    if kind in parsers:
        return parsers[kind](options)
    if kind in UNSUPPORTED_TYPES:
        raise Unsupported(
            f"device type {kind} is real vfkit's but the vfkit test double does not run it"
        )
    raise DeviceError(f"unknown device type: {kind}")


def _option(item: str) -> Option:
    # vfkit strToOption: the first '=' splits key and value; a bare key has "" as value.
    key, _, value = item.partition("=")
    return key, value


def _serial(options: list[Option]) -> VirtioSerial:
    log_file, stdio, pty = "", False, False
    for key, value in options:
        if key == "logFilePath":
            log_file = value
        elif key == "stdio":
            if value:
                raise DeviceError(f"unexpected value for virtio-serial 'stdio' option: {value}")
            stdio = True
        elif key == "pty":
            pty = True
        else:
            raise DeviceError(f"unknown option for virtio-serial devices: {key}")
    _check_serial(log_file, stdio, pty)
    if not log_file:
        which = "stdio" if stdio else "pty"
        raise Unsupported(f"virtio-serial,{which}: the vfkit test double has logFilePath only")
    return VirtioSerial(log_file)


def _check_serial(log_file: str, stdio: bool, pty: bool) -> None:
    # VirtioSerial.validate, in vfkit's order.
    if log_file and stdio:
        raise DeviceError("'logFilePath' and 'stdio' cannot be set at the same time")
    if log_file and pty:
        raise DeviceError("'logFilePath' and 'pty' cannot be set at the same time")
    if stdio and pty:
        raise DeviceError("'stdio' and 'pty' cannot be set at the same time")
    if not (log_file or stdio or pty):
        raise DeviceError("one of 'logFilePath', 'stdio' or 'pty' must be set")


def _vsock(options: list[Option]) -> VirtioVsock:
    # listen is the default "for backwards compatibility" (VirtioVsock.FromOptions); the
    # listen and connect keys take no value but vfkit ignores one if given.
    port, socket_url, listen = 0, "", True
    for key, value in options:
        if key == "socketURL":
            socket_url = value
        elif key == "port":
            port = _parse_uint32(value)
        elif key == "listen":
            listen = True
        elif key == "connect":
            listen = False
        else:
            raise DeviceError(f"unknown option for virtio-vsock devices: {key}")
    return VirtioVsock(port, socket_url, listen)


def _parse_uint32(value: str) -> int:
    # Go's strconv.ParseUint(value, 10, 32) and its two errors.
    if not value or not value.isascii() or not value.isdigit():
        raise DeviceError(f'strconv.ParseUint: parsing "{value}": invalid syntax')
    number = int(value)
    if number > MAX_VSOCK_PORT:
        raise DeviceError(f'strconv.ParseUint: parsing "{value}": value out of range')
    return number


def _fs(options: list[Option]) -> VirtioFs:
    shared_dir, mount_tag = "", ""
    for key, value in options:
        if key == "sharedDir":
            shared_dir = value
        elif key == "mountTag":
            mount_tag = value
        else:
            # Notably `readonly`: vfkit has no read-only share.
            raise DeviceError(f"unknown option for virtio-fs devices: {key}")
    if not shared_dir:
        # pkg/vf/virtio.go VirtioFs.toVz, when the VM is configured.
        raise DeviceError("missing mandatory 'sharedDir' option for virtio-fs device")
    return VirtioFs(shared_dir, mount_tag)


def _blk(options: list[Option]) -> VirtioBlk:
    path, device_id, read_only, backend = "", "", False, ""
    for key, value in options:
        if key == "deviceId":
            device_id = value
        elif key == "path":
            path = value
        elif key == "type":
            if value not in ("", "image", "dev"):
                raise DeviceError(f"unexpected value for disk 'type' option: {value}")
            backend = value
        elif key == "readonly":
            if value:
                raise DeviceError(f"unexpected value for virtio-blk 'readonly' option: {value}")
            read_only = True
        else:
            raise DeviceError(f"unknown option for virtio-blk devices: {key}")
    if backend == "dev":
        raise Unsupported("virtio-blk,type=dev: the vfkit test double takes image files only")
    if not path:
        # pkg/vf/virtio.go DiskStorageConfig.toVz.
        raise DeviceError("missing mandatory 'path' option for virtio-blk device")
    return VirtioBlk(path, device_id, read_only)


_MAC_GROUPS = re.compile(
    r"^(?:[0-9A-Fa-f]{2}([:-]))(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}$"
    r"|^[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}$"
)


def parse_mac(value: str) -> str:
    """A 48-bit MAC as Go's net.ParseMAC reads it (xx:xx.., xx-xx.., xxxx.xxxx.xxxx),
    in net.HardwareAddr's String() form; the longer EUI-64 forms Go also takes are
    refused (VZ takes 48-bit addresses only)."""
    if not _MAC_GROUPS.match(value):
        raise DeviceError(f"address {value}: invalid MAC address")
    digits = re.sub(r"[^0-9A-Fa-f]", "", value).lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def _net(options: list[Option]) -> VirtioNet:  # noqa: C901 - one branch per vfkit key
    """pkg/config/virtio.go VirtioNet.FromOptions, then validate()."""
    nat, fd, path, mac = False, None, "", ""
    # vfkitMagic defaults on with a path ("VFKT" is what gvproxy -listen-vfkit expects).
    magic = any(key in ("path", "unixSocketPath") for key, _ in options)
    has_type, type_only = False, []
    for key, value in options:
        if key == "nat":
            if value:
                raise DeviceError(f"unexpected value for virtio-net 'nat' option: {value}")
            nat = True
        elif key == "mac":
            mac = parse_mac(value)
        elif key == "fd":
            if not value.lstrip("-").isdigit():
                raise DeviceError(f'strconv.Atoi: parsing "{value}": invalid syntax')
            fd = int(value)
            if fd < 0 or fd > 2**31 - 1:
                raise DeviceError(f"invalid file descriptor: {fd}")
        elif key == "unixSocketPath":
            path = value
        elif key == "type":
            if value != "unixgram":
                raise DeviceError(
                    f"unsupported virtio-net type: {value} (only 'unixgram' is supported)"
                )
            has_type = True
        elif key == "path":
            path = value
            type_only.append(key)
        elif key == "vfkitMagic":
            if value not in ("on", "off"):
                raise DeviceError(f"invalid value for vfkitMagic: {value} (expected on/off)")
            magic = value == "on"
        elif key == "offloading":
            if value != "off":
                raise DeviceError(
                    f"invalid value for offloading: {value} (only 'off' is supported)"
                )
            type_only.append(key)
        else:
            raise DeviceError(f"unknown option for virtio-net devices: {key}")
    if has_type and not path:
        raise DeviceError("'type' option requires 'path' to be specified")
    if not has_type and type_only:
        raise DeviceError(f"'{type_only[0]}' option requires 'type' to be specified")
    _check_net_backends(nat, fd, path)
    if nat:
        raise Unsupported("virtio-net,nat needs macOS's vmnet: the vfkit test double has no NAT")
    return VirtioNet(path, fd, mac, magic)


def _check_net_backends(nat: bool, fd: int | None, path: str) -> None:
    # VirtioNet.validate: exactly one backend.
    if nat and fd is not None:
        raise DeviceError("'nat' and 'fd' cannot be set at the same time")
    if nat and path:
        raise DeviceError("'nat' and 'unixSocketPath' cannot be set at the same time")
    if fd is not None and path:
        raise DeviceError("'fd' and 'unixSocketPath' cannot be set at the same time")
    if not nat and fd is None and not path:
        raise DeviceError("one of 'nat' or 'fd' or 'unixSocketPath' must be set")


def _rng(options: list[Option]) -> VirtioRng:
    if options:
        listed = " ".join(f"{{{key} {value}}}" for key, value in options)
        raise DeviceError(f"unknown options for virtio-rng devices: [{listed}]")
    return VirtioRng()


def inspect_json(device: Device) -> dict[str, Any]:
    """The device as vfkit's /vm/inspect shows it (pkg/config/json.go), once the VM is
    configured: a unix-socket NIC has become a socket (pkg/vf/virtionet.go empties
    unixSocketPath and keeps the *os.File, which Go renders as {}). Fields Go omits
    when empty (omitempty) are left out."""
    if isinstance(device, VirtioSerial):
        return {"kind": "virtioserial", "logFile": device.log_file}
    if isinstance(device, VirtioVsock):
        vsock = {"kind": "virtiosock", "port": device.port, "socketURL": device.socket_url}
        return vsock | ({"listen": True} if device.listen else {})
    if isinstance(device, VirtioFs):
        return {"kind": "virtiofs", "mountTag": device.mount_tag, "sharedDir": device.shared_dir}
    if isinstance(device, VirtioBlk):
        disk = {"kind": "virtioblk", "devName": "virtio-blk", "imagePath": device.path}
        return _non_empty(disk, readOnly=device.read_only, deviceIdentifier=device.device_id)
    if isinstance(device, VirtioNet):
        nic = {"kind": "virtionet", "nat": False, "socket": {}}
        # A random MAC is not written back into vfkit's config.
        return _non_empty(nic, vfkitMagic=device.vfkit_magic, macAddress=device.mac)
    return {"kind": "virtiorng"}


def _non_empty(shown: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return shown | {key: value for key, value in optional.items() if value}
