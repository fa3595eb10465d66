"""PID 1's first steps in the guest, before the agent's imports: mounts, kernel modules.

/init is a Python script (`#!/usr/bin/python3 -SB`) that calls `start`: no shell, no
busybox process per mount and per module (under TCG every exec costs ~10 ms, and a
busybox insmod per module more). The modules load first, so that the kernel probes
the virtio-serial port while the agent imports the rest of itself. This module imports
only `gc`, `os`, `sys` and `harpoon.linux` (ctypes), and `socket`, `fcntl` and `struct`
for the loopback, which the agent needs anyway.

With `harpoon.selftest=1` on the kernel command line it imports the whole agent,
prints SELFTEST_MARKER and powers off: the image builder's boot test.

The cyclic garbage collector is off while the agent is imported: importing it makes
~30,000 objects, whose ~40 collections cost ~7% of the import (~0.1 s under TCG) and
find next to nothing (~250 KB of import-time cycles). Once imported they are frozen
(gc.freeze: left out of every later collection) and the collector is switched back on.
"""

from __future__ import annotations

import gc
import os
import sys

from harpoon import linux

BOOT_MODULES_PATH = "/etc/harpoon/modules.boot"
SELFTEST_ARG = "harpoon.selftest=1"
SELFTEST_MARKER = "HARPOON-SELFTEST-OK"
SELFTEST_FAILED_MARKER = "HARPOON-SELFTEST-FAILED"
PCI_DEVICES_DIR = "/sys/bus/pci/devices"
VIRTIO_DEVICES_DIR = "/sys/bus/virtio/devices"
#: A virtio device's `device` attribute for a block device (the virtio spec's id 2).
VIRTIO_ID_BLOCK = "0x0002"
CONSOLE_PATH = "/dev/console"
# What the shell /init used to export; children of the agent inherit it.
GUEST_ENVIRONMENT = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
}
# Set on the kernel command line for this interpreter alone (see harpoon.vmm.qemu): the
# processes the agent starts get a random hash seed.
BOOT_ONLY_ENVIRONMENT = ("PYTHONHASHSEED",)
# Only useful on a machine with a PCI bus (q35); microvm has none, and loading them
# costs boot time for nothing.
PCI_ONLY_MODULES = frozenset({"virtio_pci", "virtio_pci_modern_dev", "virtio_pci_legacy_dev"})

# (source, target, fstype, data), in order: what /init used to mount with mount(8).
BASE_MOUNTS: tuple[tuple[str, str, str, str], ...] = (
    ("proc", "/proc", "proc", ""),
    ("sysfs", "/sys", "sysfs", ""),
    ("devtmpfs", "/dev", "devtmpfs", ""),
    ("devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666"),
    ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
)
DIRECTORIES = ("/dev/shm",)
# linux/sockios.h, linux/if.h: struct ifreq is a 16-byte name and a 24-byte union.


def log(message: str) -> None:
    print(f"harpoon-init: {message}", file=sys.stderr, flush=True)


def mount_base_filesystems() -> None:
    for source, target, fstype, data in BASE_MOUNTS:
        try:
            os.makedirs(target, exist_ok=True)
            linux.mount(source, target, fstype, 0, data)
        except OSError as error:
            log(f"mount {fstype} on {target} failed: {error}")
    for directory in DIRECTORIES:
        os.makedirs(directory, exist_ok=True)


def module_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".ko").replace("-", "_")


def load_boot_modules(listing: str = BOOT_MODULES_PATH) -> None:
    """Loads the modules listed (one path a line, dependencies first), skipping the
    PCI transport where there is no PCI bus."""
    try:
        with open(listing) as paths:
            modules = [line.strip() for line in paths if line.strip()]
    except FileNotFoundError:
        return
    try:
        has_pci = bool(os.listdir(PCI_DEVICES_DIR))
    except OSError:
        has_pci = False
    for path in modules:
        if not has_pci and module_name(path) in PCI_ONLY_MODULES:
            continue
        try:
            linux.load_module(path)
        except OSError as error:
            log(f"insmod {path} failed: {error}")


def has_virtio_device(device_id: str, devices_dir: str = VIRTIO_DEVICES_DIR) -> bool:
    """Whether the VM has a virtio device of this type (VIRTIO_ID_*), probed by its
    transport (virtio_mmio, virtio_pci: boot modules) whether or not its driver is loaded."""
    try:
        names = os.listdir(devices_dir)
    except OSError:
        return False
    for name in names:
        try:
            with open(f"{devices_dir}/{name}/device") as device:
                if device.read().strip() == device_id:
                    return True
        except OSError:
            continue
    return False


def has_virtio_disks(devices_dir: str = VIRTIO_DEVICES_DIR) -> bool:
    """Whether the VM has a virtio-blk device (its driver need not be loaded)."""
    return has_virtio_device(VIRTIO_ID_BLOCK, devices_dir)


def load_filesystems_for_disks() -> None:
    """A VM with disks (an erofs rootfs) gets its filesystems' modules at boot, so that a
    template of its layout holds them loaded (under TCG, loading ext4 and its
    dependencies takes ~1 s of a restored VM's Create). Not the disks' driver: a template
    must not have probed its placeholder disks (harpoon.agent.modules loads it)."""
    if not has_virtio_disks():
        return
    from harpoon.agent import modules

    for fstype in modules.DISK_FILESYSTEMS:
        try:
            modules.load_filesystem(fstype)
        except OSError as error:
            log(f"loading the modules of {fstype} failed: {error}")


def open_console(path: str = CONSOLE_PATH) -> None:
    """Gives PID 1 its standard descriptors on the console if the kernel could not.

    The kernel opens /dev/console for init before any module loads; a VM whose only
    console is a virtio console (vfkit: `console=hvc0`, and Debian builds virtio_console
    as a module) has none yet, so init starts without descriptors 0-2 and Python with
    sys.stderr None: the agent's messages, which the host quotes from the console log
    when a guest fails, would go nowhere (and the first files opened would take 0-2).
    Once the boot modules are loaded the console exists: open it now. A VM with a serial
    console (QEMU's) has them already, and nothing changes."""
    missing = [fd for fd in (0, 1, 2) if not _is_open(fd)]
    if not missing:
        return
    try:
        console = os.open(path, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return  # no console at all: nothing to say things on
    for fd in missing:
        if fd != console:
            os.dup2(console, fd)
    if console in (0, 1, 2):
        os.set_inheritable(console, True)  # as the kernel's would be (os.open's are not)
    else:
        os.close(console)
    for name, fd, mode, buffering in (("stdin", 0, "r", -1), ("stdout", 1, "w", 1),
                                      ("stderr", 2, "w", 1)):  # fmt: skip
        if getattr(sys, name) is None:
            stream = open(fd, mode, buffering, errors="backslashreplace", closefd=False)  # noqa: SIM115
            setattr(sys, name, stream)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def selftest_requested() -> bool:
    try:
        with open("/proc/cmdline") as cmdline:
            return SELFTEST_ARG in cmdline.read().split()
    except OSError:
        return False


def selftest() -> None:
    """Imports the agent (its whole module closure) and powers off."""
    try:
        from google.protobuf.internal import api_implementation

        import harpoon.agent.main  # noqa: F401

        print(f"protobuf implementation: {api_implementation.Type()}", flush=True)
        print(SELFTEST_MARKER, flush=True)
    except BaseException:
        import traceback

        traceback.print_exc()
        print(SELFTEST_FAILED_MARKER, flush=True)
    os.sync()
    linux.reboot_power_off()


def bring_up_loopback() -> None:
    """Sets the guest's `lo` up, as a host's is: a container without a network namespace
    of its own (`--net-host`) shares the guest's, and expects 127.0.0.1 to work. (crun
    sets `lo` up in the namespaces it creates.) Best effort: a guest without it still
    runs containers."""
    try:
        linux.set_interface_up("lo")
    except OSError as error:
        log(f"cannot set lo up: {error}")


def trim_import_path() -> None:
    """Drops the sys.path entries that hold no module in the guest: /init's directory
    (/) and the stdlib zip Debian does not ship. Every import of a top-level module
    (the agent makes ~100, failed ones included) would otherwise look in / first."""
    sys.path[:] = [p for p in sys.path if p not in ("", "/") and not p.endswith(".zip")]


def start() -> None:
    """The guest's PID 1: prepare the system, then become the agent."""
    gc.disable()
    trim_import_path()
    os.environ.update(GUEST_ENVIRONMENT)
    for name in BOOT_ONLY_ENVIRONMENT:
        os.environ.pop(name, None)
    mount_base_filesystems()
    load_boot_modules()
    open_console()
    load_filesystems_for_disks()
    bring_up_loopback()
    if selftest_requested():
        selftest()
    from harpoon.agent.main import main

    gc.freeze()
    gc.enable()
    main()
