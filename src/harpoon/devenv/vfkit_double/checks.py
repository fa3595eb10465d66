"""What vfkit and Virtualization.framework check on disk before a VM starts.

vfkit refuses a configuration in several places, each with its own words:
- pkg/vf/bootloader.go: on an Apple-silicon Mac the kernel must be an uncompressed
  arm64 Image (`ARMd` at offset 0x38 of its first 2048 bytes), else "kernel must be
  uncompressed, PATH is a compressed file"; Code-Hex/vz bootloader.go then os.Stat()s
  the kernel ("invalid linux kernel path: ...") and the initrd ("invalid initial RAM
  disk path: ..."), so an initrd is mandatory;
- pkg/config/virtio.go VirtioBlk.validate: a disk image must open and must not be qcow2
  ("vfkit does not support qcow2 image format"); VZ takes a blockDeviceIdentifier of
  at most 20 ASCII bytes (validateBlockDeviceIdentifier);
- Code-Hex/vz shared_directory.go: a shared directory is os.Stat()ed; VZ takes a
  virtio-fs tag of 1 to 36 bytes (the virtio-fs config field).

The double also decides here which Mac it plays (`guest_arch`): an Apple-silicon one
(arm64 guests, QEMU's aarch64) unless the kernel is an x86 kernel (an ELF vmlinux for
x86-64 or a bzImage) -- then an Intel Mac, where vfkit checks no kernel format.
HARPOON_VFKIT_DOUBLE_ARCH=amd64|arm64 forces one, to check that a compressed arm64
kernel is refused.
"""

from __future__ import annotations

import os
from typing import Literal

from harpoon.devenv.vfkit_double import devices
from harpoon.devenv.vfkit_double.cmdline import Options

GuestArch = Literal["amd64", "arm64"]
ARCH_ENV = "HARPOON_VFKIT_DOUBLE_ARCH"
#: vfkit pkg/vf/bootloader.go reads this much of the kernel for its magic.
KERNEL_HEAD_BYTES = 2048
ARM64_MAGIC_OFFSET = 0x38
ARM64_MAGIC = b"ARMd"
QCOW2_MAGIC = b"QFI\xfb"
MAX_DEVICE_ID_BYTES = 20
MAX_TAG_BYTES = 36
_ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 62
_BZIMAGE_MAGIC_OFFSET = 0x202
_BZIMAGE_MAGIC = b"HdrS"


class ConfigurationError(ValueError):
    """A VM vfkit would refuse to create; the message is vfkit's (or VZ's)."""


def go_error(op: str, path: str, error: OSError) -> str:
    """An OSError in Go's words: `open /x: no such file or directory`."""
    reason = error.strerror or str(error)
    return f"{op} {path}: {reason[:1].lower()}{reason[1:]}"


def is_x86_kernel(head: bytes) -> bool:
    elf_x86 = head[:4] == _ELF_MAGIC and int.from_bytes(head[18:20], "little") == _EM_X86_64
    at = _BZIMAGE_MAGIC_OFFSET
    return elf_x86 or head[at : at + len(_BZIMAGE_MAGIC)] == _BZIMAGE_MAGIC


def is_uncompressed_arm64_kernel(head: bytes) -> bool:
    """vfkit pkg/vf/bootloader.go isUncompressedArm64Kernel."""
    at = ARM64_MAGIC_OFFSET
    return head[at : at + len(ARM64_MAGIC)] == ARM64_MAGIC


def guest_arch(head: bytes, forced: str | None) -> GuestArch:
    """The Mac the double plays for a kernel starting with `head` (see the module doc)."""
    if forced:
        if forced not in ("amd64", "arm64"):
            raise ConfigurationError(f"{ARCH_ENV}={forced}: use amd64 or arm64")
        return "amd64" if forced == "amd64" else "arm64"
    return "amd64" if is_x86_kernel(head) else "arm64"


def check_device_id(device_id: str) -> None:
    if len(device_id.encode()) > MAX_DEVICE_ID_BYTES or not device_id.isascii():
        raise ConfigurationError(
            f"invalid block device identifier {device_id!r}: it must be an ASCII string of "
            f"{MAX_DEVICE_ID_BYTES} bytes or less (VZVirtioBlockDeviceConfiguration)"
        )


def check_tag(tag: str) -> None:
    if not tag or len(tag.encode()) > MAX_TAG_BYTES:
        raise ConfigurationError(
            f"invalid virtio-fs tag {tag!r}: it must be 1 to {MAX_TAG_BYTES} bytes "
            "(VZVirtioFileSystemDeviceConfiguration)"
        )


def check_vm(options: Options) -> GuestArch:
    """Reads what vfkit reads before it starts a VM; the Mac the double plays, or
    ConfigurationError with vfkit's message."""
    boot = options.bootloader
    try:
        with open(boot.kernel, "rb") as kernel:
            head = kernel.read(KERNEL_HEAD_BYTES)
    except OSError as error:
        # On arm64 vfkit opens the kernel first (the raw error); elsewhere vz stat()s it.
        raise ConfigurationError(
            f"invalid linux kernel path: {go_error('stat', boot.kernel, error)}"
        ) from None
    arch = guest_arch(head, os.environ.get(ARCH_ENV))
    if arch == "arm64" and not is_uncompressed_arm64_kernel(head):
        raise ConfigurationError(f"kernel must be uncompressed, {boot.kernel} is a compressed file")
    try:
        os.stat(boot.initrd)
    except OSError as error:
        raise ConfigurationError(
            f"invalid initial RAM disk path: {go_error('stat', boot.initrd, error)}"
        ) from None
    for device in options.devices:
        if isinstance(device, devices.VirtioBlk):
            _check_disk(device)
        elif isinstance(device, devices.VirtioFs):
            _check_share(device)
    return arch


def _check_disk(disk: devices.VirtioBlk) -> None:
    try:
        with open(disk.path, "rb") as image:
            header = image.read(len(QCOW2_MAGIC))
    except OSError as error:
        raise ConfigurationError(
            f"failed to open file {disk.path}: {go_error('open', disk.path, error)}"
        ) from None
    if not header:
        raise ConfigurationError(f"failed to read the header of file {disk.path}: EOF")
    if header == QCOW2_MAGIC:
        raise ConfigurationError("vfkit does not support qcow2 image format")
    if disk.device_id:
        check_device_id(disk.device_id)


def _check_share(share: devices.VirtioFs) -> None:
    try:
        os.stat(share.shared_dir)
    except OSError as error:
        raise ConfigurationError(go_error("stat", share.shared_dir, error)) from None
    check_tag(share.tag)
