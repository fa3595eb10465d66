"""Linux system calls the standard library lacks: mount, umount2, sethostname, prctl,
personality, finit_module, and setting a network interface up.

Shared by the host (the shim mounts containerd's rootfs) and the guest agent, so it
imports only ctypes, os and sys and does its work lazily: the guest pays for loading libc
through ctypes once, on first use.
"""

from __future__ import annotations

import ctypes
import os
import sys
from errno import EEXIST, ENOSYS
from functools import cache

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

#: What the host's kernel offers that macOS's does not: callers on macOS take another
#: way (harpoon.vmm.qemu_launch says which) instead of calling these.
HAS_PARENT_DEATH_SIGNAL = sys.platform == "linux"
HAS_NETWORK_NAMESPACES = sys.platform == "linux"
HAS_BIND_MOUNTS = sys.platform == "linux"  # containerd: core/mount/mount_darwin.go

MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# mount(8)-style option words and the flags they set (True) or clear (False).
_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "noatime": (MS_NOATIME, True),
    "nodiratime": (MS_NODIRATIME, True),
    "relatime": (MS_RELATIME, True),
    "strictatime": (MS_STRICTATIME, True),
    "bind": (MS_BIND, True),
    "rbind": (MS_BIND | MS_REC, True),
    "remount": (MS_REMOUNT, True),
    "defaults": (0, True),
}
_PROPAGATION_OPTIONS = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
}


def parse_mount_options(options: list[str] | tuple[str, ...]) -> tuple[int, int, str]:
    """Splits mount(8) options into (flags, propagation flags, filesystem data string)."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for option in options:
        if option in _FLAG_OPTIONS:
            bits, set_ = _FLAG_OPTIONS[option]
            flags = flags | bits if set_ else flags & ~bits
        elif option in _PROPAGATION_OPTIONS:
            propagation |= _PROPAGATION_OPTIONS[option]
        else:
            data.append(option)
    return flags, propagation, ",".join(data)


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    _check(
        _libc().mount(
            source.encode(),
            target.encode(),
            fstype.encode(),
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target} ({fstype})",
    )


def mount_with_options(source: str, target: str, fstype: str, options: list[str]) -> None:
    """Mounts like mount(8) -o OPTIONS, including a read-only bind (which needs a remount)."""
    flags, propagation, data = parse_mount_options(options)
    mount(source, target, fstype, flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        mount("", target, "", flags | MS_REMOUNT, "")
    if propagation:
        mount("", target, "", propagation, "")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc().umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc().sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname {name}")


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
#: struct ifreq with its ifr_flags (name, flags; padded to the union's size).
IFREQ_FLAGS = "16sH22x"


def set_interface_up(name: str) -> None:
    """Sets the network interface `name` of this thread's network namespace up (as
    `ip link set NAME up`); OSError if there is none."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack(IFREQ_FLAGS, name.encode(), 0)
        flags = struct.unpack(IFREQ_FLAGS, fcntl.ioctl(probe, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack(IFREQ_FLAGS, name.encode(), flags | IFF_UP))


def prctl(option: int, arg: int) -> None:
    _check(_libc().prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def set_personality(persona: int) -> int:
    """personality(2): sets the execution domain and its flags (ADDR_NO_RANDOMIZE, …)
    for the calling thread and what it execs; returns the previous one."""
    previous = int(_libc().personality(ctypes.c_ulong(persona)))
    if previous == -1:
        _check(-1, f"personality {persona:#x}")
    return previous


def set_parent_death_signal(signal_number: int) -> None:
    """Asks the kernel to send us signal_number when the thread that forked us dies
    (Linux's prctl: OSError ENOSYS elsewhere, rather than a missing libc symbol)."""
    if not HAS_PARENT_DEATH_SIGNAL:
        raise OSError(ENOSYS, f"no parent-death signal on {sys.platform}")
    prctl(PR_SET_PDEATHSIG, signal_number)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below path, deepest first (the order to unmount them in)."""
    prefix = path.rstrip("/") + "/"
    found: list[str] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path.rstrip("/") or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_all(path: str) -> None:
    """Unmounts everything at or below path, lazily if a mount is busy."""
    for point in mounts_under(path):
        try:
            umount(point)
        except OSError:
            umount(point, MNT_DETACH)


LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def reboot_power_off() -> None:
    """reboot(2) with POWER_OFF: ends the VM (only PID 1 in the guest calls this)."""
    _check(_libc().reboot(ctypes.c_int(LINUX_REBOOT_CMD_POWER_OFF)), "reboot")


# finit_module(2) has no glibc wrapper: it is called through syscall(2) by number.
_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}
_MODULE_PARAMS = b""


def load_module(path: str) -> bool:
    """Loads the kernel module file at `path` (uncompressed .ko) with finit_module(2):
    True when loaded, False when it was loaded already. The guest agent loads its boot
    modules this way, in its own process, instead of one insmod process per module."""
    machine = os.uname().machine
    number = _SYS_FINIT_MODULE.get(machine)
    if number is None:
        raise OSError(f"finit_module: no syscall number known for {machine}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = _libc().syscall(
            ctypes.c_long(number), ctypes.c_int(fd), ctypes.c_char_p(_MODULE_PARAMS), 0
        )
    finally:
        os.close(fd)
    if result != 0:
        errno = ctypes.get_errno()
        if errno == EEXIST:
            return False
        raise OSError(errno, f"finit_module {path}: {os.strerror(errno)}")
    return True


CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


def unshare(flags: int) -> None:
    _check(_libc().unshare(ctypes.c_int(flags)), f"unshare {flags:#x}")


def setns(fd: int, nstype: int) -> None:
    _check(_libc().setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns {nstype:#x}")
