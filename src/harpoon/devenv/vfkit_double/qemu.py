"""The QEMU command line that stands in for a vfkit VM (pure: no I/O).

The machine is the one harpoon's own QEMU backend boots reliably (harpoon.vmm.qemu_launch
PROFILES): x86-64 guests on `-M microvm` (virtio-mmio), arm64 guests on `-M virt` with
a cortex-a72 under TCG. Every device is a virtio-mmio one, found by the guest's
virtio_mmio driver. QEMU starts paused (`-S`): the double resumes it over QMP, which is
VZ's Starting -> Running.

vfkit's devices become:
- `virtio-serial,logFilePath=F`: a `virtconsole` port (hvc0, hvc1...) on one
  virtio-serial device, its output in a file chardev. VZ opens the file without
  append (vfkit passes shouldAppend=false to vz.NewFileSerialPortAttachment), so does
  QEMU here (append=off): the log starts empty;
- `virtio-vsock` (any number of ports): one vhost-user-vsock device, served by
  vhost-device-vsock (harpoon.devenv.vfkit_double.vsock);
- `virtio-fs`: a vhost-user-fs device per share, each served by its own virtiofsd,
  tag = the mountTag;
- `virtio-blk`: a raw image (`driver=file`), `serial=deviceId`: what the guest reads in
  /sys/block/vdX/serial (VZ's blockDeviceIdentifier is that same virtio field);
- `virtio-net`: the connected unixgram socket vfkit would hand VZ, given to QEMU's
  `-netdev dgram` as an inherited descriptor (local.type=fd: QEMU 7.2 sends each frame
  as one datagram on it), with the NIC's MAC;
- `virtio-rng`: virtio-rng fed from /dev/urandom.
Guest RAM is a shared memfd: vhost-user daemons map it.

Differences from VZ: the x86 TCG kernel arguments of harpoon.vmm.qemu_launch
(`tsc_early_khz=2000000 tsc=reliable`: without them a loaded TCG host hangs the boot
now and then, or slows timers to 4 ms ticks) are appended to the guest's command line
when QEMU emulates an x86 CPU; the devices sit on virtio-mmio, not PCI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.vfkit_double import devices
from harpoon.devenv.vfkit_double.checks import GuestArch
from harpoon.devenv.vfkit_double.cmdline import Options
from harpoon.vmm.qemu_launch import DEFAULT_MACHINE, PROFILES, MachineProfile

MEMORY_BACKEND_ID = "ram"
QMP_CHARDEV = "qmp"
VSOCK_CHARDEV = "vsock"


def profile(arch: GuestArch) -> MachineProfile:
    return PROFILES[(arch, DEFAULT_MACHINE[arch])]


@dataclass(frozen=True)
class Wiring:
    """What the double set up for QEMU before launching it."""

    #: The QMP socket, bound and listening, inherited by QEMU.
    qmp_fd: int
    #: vhost-device-vsock's vhost-user socket, when the VM has vsock ports.
    vsock_socket: Path | None = None
    #: Each virtio-fs device's virtiofsd socket, in command-line order.
    virtiofs_sockets: tuple[Path, ...] = ()
    #: Each virtio-net device's connected datagram socket, inherited, in order.
    nic_fds: tuple[int, ...] = ()
    #: Each virtio-net device's MAC (a random one where vfkit was given none).
    nic_macs: tuple[str, ...] = ()


def option_value(text: str) -> str:
    """A value inside a QEMU option string: commas are doubled, as QEMU's parser wants."""
    return text.replace(",", ",,")


def kernel_command_line(options: Options, arch: GuestArch, accelerator: str) -> str:
    extra = profile(arch).kernel_args if arch == "amd64" and accelerator == "tcg" else ()
    return " ".join(part for part in (options.bootloader.cmdline, *extra) if part)


def command_line(options: Options, arch: GuestArch, accelerator: str, wiring: Wiring) -> list[str]:
    """QEMU's argv for the VM `options` describes, paused at start."""
    machine = profile(arch)
    args = [
        machine.binary,
        "-M", f"{machine.machine},memory-backend={MEMORY_BACKEND_ID}",
        "-accel", "tcg,thread=multi" if accelerator == "tcg" else accelerator,
        "-m", f"{options.memory_mib}M",
        "-smp", str(options.cpus),
        "-object",
        f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={options.memory_mib}M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S",
        "-kernel", options.bootloader.kernel,
        "-initrd", options.bootloader.initrd,
        "-append", kernel_command_line(options, arch, accelerator),
        "-chardev", f"socket,id={QMP_CHARDEV},fd={wiring.qmp_fd},server=on,wait=off",
        "-mon", f"chardev={QMP_CHARDEV},mode=control",
    ]  # fmt: skip
    if accelerator != "tcg":
        args += ["-cpu", "host"]
    elif machine.cpu_tcg:
        args += ["-cpu", machine.cpu_tcg]
    return args + device_args(options.devices, wiring)


def device_args(found: tuple[devices.Device, ...], wiring: Wiring) -> list[str]:
    args = _console_args([d for d in found if isinstance(d, devices.VirtioSerial)])
    shares = [d for d in found if isinstance(d, devices.VirtioFs)]
    for index, (share, path) in enumerate(zip(shares, wiring.virtiofs_sockets, strict=True)):
        args += [
            "-chardev", f"socket,id=fs{index},path={option_value(str(path))}",
            "-device", f"vhost-user-fs-device,chardev=fs{index},tag={option_value(share.tag)}",
        ]  # fmt: skip
    disks = [d for d in found if isinstance(d, devices.VirtioBlk)]
    for index, disk in enumerate(disks):
        read_only = ",read-only=on" if disk.read_only else ""
        serial = f",serial={option_value(disk.device_id)}" if disk.device_id else ""
        args += [
            "-blockdev",
            f"driver=file,node-name=blk{index},filename={option_value(disk.path)}{read_only}",
            "-device", f"virtio-blk-device,drive=blk{index}{serial}",
        ]  # fmt: skip
    nics = zip(wiring.nic_fds, wiring.nic_macs, strict=True)
    for index, (fd, mac) in enumerate(nics):
        args += [
            "-netdev", f"dgram,id=net{index},local.type=fd,local.str={fd}",
            "-device", f"virtio-net-device,netdev=net{index},mac={mac}",
        ]  # fmt: skip
    if wiring.vsock_socket is not None:
        args += [
            "-chardev", f"socket,id={VSOCK_CHARDEV},path={option_value(str(wiring.vsock_socket))}",
            "-device", f"vhost-user-vsock-device,chardev={VSOCK_CHARDEV}",
        ]  # fmt: skip
    if any(isinstance(d, devices.VirtioRng) for d in found):
        args += [
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0",
        ]  # fmt: skip
    return args


def _console_args(consoles: list[devices.VirtioSerial]) -> list[str]:
    if not consoles:
        return []
    args = ["-device", "virtio-serial-device,id=vser0"]
    for index, console in enumerate(consoles):
        args += [
            "-chardev", f"file,id=con{index},path={option_value(console.log_file)},append=off",
            "-device", f"virtconsole,bus=vser0.0,chardev=con{index}",
        ]  # fmt: skip
    return args
