"""The QEMU command line and its launch: everything up to a QEMU process running.

x86_64 guests run on `-M microvm` (no PCI, no firmware, the ELF vmlinux entered
through PVH so the kernel is not decompressed at every boot); `q35` is the fallback.
arm64 guests run on `-M virt`. The agent channel is a virtio-serial port whose host
end is a unix socket QEMU listens on.

Nothing here needs an event loop, so a shim can launch its VM before it has loaded
asyncio (harpoon.shim.daemon) and QemuVM (harpoon.vmm.qemu) then carries on with the
process. `command_line` is pure; `launch` does the I/O of a launch (state directory,
stale sockets, the log) and spawns QEMU with a parent-death signal, so a shim killed
with SIGKILL takes its VM with it.

On macOS (`Host.system` "darwin") QEMU runs under HVF with `-cpu host`: arm64 guests on
`-M virt` as on Linux, amd64 guests on `-M q35` (what Intel Macs' QEMU users run under
HVF; microvm there is unproven, and stays available by naming it). What Linux alone has
is not used there: shares are 9p (virtiofsd and memfd RAM are Linux's: a virtiofs
share is refused), no network namespace (refused), and no parent-death signal. In its
place, a shim that exits ends its VM as it stops, and one killed with SIGKILL leaves
QEMU to `shim delete`, which containerd runs for a dead shim and which kills the VMM
its pid file names (harpoon.vmm.leftovers). The host is a parameter of the command
line, so tests check macOS's command lines on Linux.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harpoon import linux, private
from harpoon.vmm import accel, prelaunch, virtiofsd
from harpoon.vmm.backend import host_arch
from harpoon.vmm.base import (
    AGENT_PORT_NAME,
    STDIO_PORT_NAME,
    VMConfig,
    VMError,
)
from harpoon.vmm.devices import NIC, Disk, Share, StreamBackend, TapBackend
from harpoon.vmm.gvproxy_nics import gvproxy_config, remove_gvproxy_files, start_gvproxies
from harpoon.vmm.kernel_args import BASE_KERNEL_ARGS
from harpoon.vmm.process import VmmProcess, die_with_parent, die_with_parent_at_lowest_priority

log = logging.getLogger(__name__)

# What a restore adds to the command line: QEMU waits for `migrate-incoming` (QMP)
# instead of booting, so that the host can connect to the guest's ports first. The
# state comes from a file QEMU inherits (QemuLaunch.incoming): no `sh -c cat` per
# restore. (QEMU 7.2 takes the x-ignore-shared capability only through QMP.)
RESTORE_ARGS = ("-incoming", "defer")
# The ports' device ids: QEMU names them in VSERPORT_CHANGE events (harpoon.vmm.qemu).
AGENT_DEVICE_ID = "agent-port"
STDIO_DEVICE_ID = "stdio-port"
# The chardevs whose sockets harpoon binds and QEMU inherits: agent port, stdio port, QMP.
LISTENER_IDS = ("agent", "stdio", "qmp")
LISTEN_BACKLOG = 4
MEMORY_BACKEND_ID = "ram"
# On a loaded host the x86 guest cannot calibrate its TSC against the PIT and hangs
# silently before printing anything (about one boot in two under load, measured);
# telling it the frequency skips the calibration.
# tsc=reliable keeps the TSC as the clocksource: otherwise the guest falls back to
# refined-jiffies and its timers (asyncio's included) tick only every 4 ms.
X86_KERNEL_ARGS = ("tsc_early_khz=2000000", "tsc=reliable")


@dataclass(frozen=True)
class MachineProfile:
    """What differs between QEMU machine types: binary, machine, device suffix, console."""

    binary: str
    machine: str
    device_suffix: str  # "device" for virtio-mmio, "pci" for PCI machines
    console: str
    cpu_tcg: str | None = None
    kernel_args: tuple[str, ...] = ()


PROFILES: dict[tuple[str, str], MachineProfile] = {
    ("amd64", "microvm"): MachineProfile(
        "qemu-system-x86_64",
        "microvm,rtc=on,x-option-roms=off",
        "device",
        "ttyS0",
        kernel_args=X86_KERNEL_ARGS,
    ),
    ("amd64", "q35"): MachineProfile(
        "qemu-system-x86_64", "q35", "pci", "ttyS0", kernel_args=X86_KERNEL_ARGS
    ),
    ("arm64", "virt"): MachineProfile(
        "qemu-system-aarch64", "virt", "device", "ttyAMA0", cpu_tcg="cortex-a72"
    ),
}
DEFAULT_MACHINE = {"amd64": "microvm", "arm64": "virt"}
#: macOS's, where they differ (see the module's docstring).
DARWIN_DEFAULT_MACHINE = {**DEFAULT_MACHINE, "amd64": "q35"}


@dataclass(frozen=True)
class Host:
    """The host a command line is for: its system (sys.platform's word: linux, darwin)
    and architecture (harpoon.vmm.backend.host_arch's word)."""

    system: str
    arch: str

    @property
    def darwin(self) -> bool:
        return self.system == "darwin"


def this_host() -> Host:
    return Host(sys.platform, host_arch())


def profile_for(config: VMConfig, host: Host | None = None) -> MachineProfile:
    defaults = DARWIN_DEFAULT_MACHINE if (host or this_host()).darwin else DEFAULT_MACHINE
    machine = config.machine or defaults.get(config.arch, "")
    try:
        return PROFILES[(config.arch, machine)]
    except KeyError:
        raise VMError(
            f"no QEMU machine profile for arch {config.arch!r} machine {machine!r}"
        ) from None


@functools.cache
def supported_machines(binary: str) -> frozenset[str]:
    """The machine types this QEMU binary offers (`-M help`), cached on disk per binary
    version: asking QEMU costs ~90 ms, and every shim asks once."""
    cache: Path | None = None
    try:
        info = os.stat(binary)
        key = hashlib.sha256(f"{binary}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}".encode())
        cache = accel.CACHE_DIR / f"machines-{key.hexdigest()[:16]}"
        return frozenset(private.read_file(cache).decode().split())
    except OSError:
        pass
    try:
        listing = subprocess.run(
            [binary, "-M", "help"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    machines = frozenset(line.split()[0] for line in listing.splitlines()[1:] if line.strip())
    if cache is not None and machines:
        with contextlib.suppress(OSError):
            private.directory(cache.parent)
            temporary = cache.with_suffix(f".{os.getpid()}")
            private.write_file(temporary, "\n".join(sorted(machines)).encode())
            temporary.replace(cache)
    return machines


def with_available_machine(config: VMConfig, binary: str) -> VMConfig:
    """config, moved from microvm to q35 when this QEMU was built without microvm."""
    if config.machine is not None or DEFAULT_MACHINE.get(config.arch) != "microvm":
        return config
    if "microvm" in supported_machines(binary) or "q35" not in supported_machines(binary):
        return config
    return dataclasses.replace(config, machine="q35")


def with_room_for_devices(config: VMConfig) -> VMConfig:
    """config on q35 when it has more devices than microvm has transports (an erofs
    rootfs of many layers: a disk each); PCI_SLOTS x 8 functions there."""
    if config.machine is not None or DEFAULT_MACHINE.get(config.arch) != "microvm":
        return config
    if 1 + len(config.devices) <= MICROVM_TRANSPORTS:
        return config
    return dataclasses.replace(config, machine="q35")


#: The slots of q35's root bus a VM's virtio devices take (0 is the host bridge, 31 the
#: ICH9's), eight functions each.
PCI_SLOTS = range(2, 31)
PCI_FUNCTIONS = 8


def _pci_addresses(args: list[str]) -> list[str]:
    """args with every virtio PCI device given an address of its own, eight functions to
    a slot (QEMU's automatic placement uses one slot per device, and runs out)."""
    placed: list[str] = []
    index = 0
    for arg in args:
        driver = arg.split(",", 1)[0]
        if (
            placed
            and placed[-1] == "-device"
            and driver.startswith(("virtio-", "vhost-"))
            and (driver.endswith("-pci"))
        ):
            slot, function = divmod(index, PCI_FUNCTIONS)
            if slot >= len(PCI_SLOTS):
                raise VMError(
                    f"more than {len(PCI_SLOTS) * PCI_FUNCTIONS} PCI devices: no room on q35"
                )
            arg += f",addr={PCI_SLOTS[slot]:#x}.{function}"
            if function == 0:
                arg += ",multifunction=on"
            index += 1
        placed.append(arg)
    return placed


def command_line(
    config: VMConfig,
    accelerator: str,
    *,
    restoring: bool = False,
    listeners: dict[str, int] | None = None,
    host: Host | None = None,
) -> list[str]:
    """The full QEMU argv for config (pure: no I/O), under the given accelerator on
    `host` (default: this one); a VM being restored maps its memory file privately.
    listeners: the listening sockets QEMU inherits, by chardev id (LISTENER_IDS);
    without them QEMU binds the paths."""

    def socket_chardev(chardev: str, path: Path) -> str:
        return _socket_chardev(chardev, path, (listeners or {}).get(chardev))

    host = host or this_host()
    profile = profile_for(config, host)
    # Cross-architecture guests (arm64 on an x86 host) can only be emulated.
    if config.arch != host.arch:
        accelerator = "tcg"
    machine = profile.machine
    virtiofs = any(share.fs == "virtiofs" for share in config.shares)
    if virtiofs and host.darwin:
        raise VMError(f"VM {config.name}: no virtiofs share on macOS (virtiofsd is Linux's)")
    if virtiofs and restoring:
        raise VMError(f"VM {config.name}: a virtiofs share cannot be restored (QEMU 7.2)")
    if config.memory_file is not None or virtiofs:
        machine += f",memory-backend={MEMORY_BACKEND_ID}"
    args = [
        profile.binary,
        "-M",
        machine,
        "-accel",
        "tcg,thread=multi" if accelerator == "tcg" else accelerator,
        "-m",
        f"{config.memory_mib}M",
        "-smp",
        str(config.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(config.kernel),
        "-initrd",
        str(config.initrd),
        "-append",
        " ".join(
            (
                f"console={profile.console}",
                *BASE_KERNEL_ARGS,
                *profile.kernel_args,
                *config.kernel_args,
            )
        ),
        "-chardev",
        f"file,id=console,path={config.console_log}",
        "-serial",
        "chardev:console",
        "-chardev",
        socket_chardev("agent", config.agent_socket),
        "-device",
        f"virtio-serial-{profile.device_suffix}",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},id={AGENT_DEVICE_ID}",
        "-chardev",
        socket_chardev("stdio", config.stdio_socket),
        "-device",
        f"virtserialport,chardev=stdio,name={STDIO_PORT_NAME},id={STDIO_DEVICE_ID}",
        "-chardev",
        socket_chardev("qmp", config.control_socket),
        "-mon",
        "chardev=qmp,mode=control",
        "-pidfile",
        str(config.pid_file),
    ]
    if accelerator != "tcg":
        args += ["-cpu", "host"]
    elif profile.cpu_tcg:
        args += ["-cpu", profile.cpu_tcg]
    if config.memory_file is not None:
        mapping = "off" if restoring else "on"
        args += [
            "-object",
            f"memory-backend-file,id={MEMORY_BACKEND_ID},size={config.memory_mib}M,"
            f"mem-path={config.memory_file},share={mapping}",
        ]
    elif virtiofs:
        # vhost-user: virtiofsd maps the guest's RAM, so it must be shared memory.
        args += [
            "-object",
            f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={config.memory_mib}M,share=on",
        ]
    args += _device_args(config, profile)
    return _pci_addresses(args) if profile.device_suffix == "pci" else args


def _socket_chardev(chardev: str, path: Path, fd: int | None) -> str:
    where = f"path={path}" if fd is None else f"fd={fd}"
    return f"socket,id={chardev},{where},server=on,wait=off"


#: The virtio-mmio transports of QEMU's microvm (hw/i386/microvm.h): one per device.
MICROVM_TRANSPORTS = 24


def _device_args(config: VMConfig, profile: MachineProfile) -> list[str]:
    """The flags of config's typed devices (harpoon.vmm.devices)."""
    # The agent's virtio-serial device, then one transport per typed device.
    wanted = 1 + len(config.devices)
    if profile.machine.startswith("microvm") and wanted > MICROVM_TRANSPORTS:
        raise VMError(
            f"VM {config.name} needs {wanted} virtio devices ({len(config.disks)} disks: an "
            f"erofs rootfs has one per layer) and QEMU's microvm has {MICROVM_TRANSPORTS}"
        )
    args: list[str] = []
    for index, share in enumerate(config.shares):
        if share.fs == "virtiofs":
            args += _virtiofs_args(share, index, config.state_dir, profile)
        else:
            args += _share_args(share, index, profile)
    for disk in config.disks:
        args += _disk_args(disk, profile)
    for nic in config.nics:
        args += _nic_args(nic, profile, config.state_dir)
    if config.vsock is not None:
        args += ["-device", f"vhost-vsock-{profile.device_suffix},guest-cid={config.vsock.cid}"]
    return args


def _virtiofs_args(share: Share, index: int, state_dir: Path, profile: MachineProfile) -> list[str]:
    # Served by a virtiofsd of its own (launch); QEMU 7.2 cannot migrate this device, so
    # no VM template holds one (harpoon.sandbox.plan boots such VMs cold).
    return [
        "-chardev",
        f"socket,id=vfs{index},path={_option(virtiofsd.socket_path(state_dir, share))}",
        "-device",
        f"vhost-user-fs-{profile.device_suffix},chardev=vfs{index},tag={share.tag}",
    ]


def _share_args(share: Share, index: int, profile: MachineProfile) -> list[str]:
    readonly = ",readonly=on" if share.read_only else ""
    return [
        "-fsdev",
        # remap: an export may hold mounts of other filesystems (harpoon.sandbox.rootfs),
        # whose inode numbers must not collide in the guest.
        f"local,id=fs{index},path={_option(share.host_path)},security_model=none,"
        f"multidevs=remap{readonly}",
        "-device",
        f"virtio-9p-{profile.device_suffix},fsdev=fs{index},mount_tag={share.tag}",
    ]


def _disk_args(disk: Disk, profile: MachineProfile) -> list[str]:
    # The serial is how the guest finds the disk (/sys/block/*/serial).
    readonly = ",read-only=on" if disk.read_only else ""
    return [
        "-blockdev",
        f"driver=file,node-name=disk-{disk.id},filename={_option(disk.image)}{readonly}",
        "-device",
        f"virtio-blk-{profile.device_suffix},drive=disk-{disk.id},serial={disk.id}",
    ]


def _nic_args(nic: NIC, profile: MachineProfile, state_dir: Path) -> list[str]:
    backend = nic.backend
    if isinstance(backend, TapBackend):
        netdev = f"tap,id=net-{nic.id},ifname={backend.ifname},script=no,downscript=no"
    elif isinstance(backend, StreamBackend):
        # A gvproxy of the VM's own listens in its state directory, wherever that is (a
        # template's build has its own).
        socket = gvproxy_config(state_dir, nic).net_socket if backend.gvproxy else backend.socket
        # QEMU connects to the socket (gvproxy listens) as it starts; 7.2 has no
        # `reconnect` (8.0 has): a gvproxy that dies is the VM's network gone.
        netdev = f"stream,id=net-{nic.id},server=off,addr.type=unix,addr.path={_option(socket)}"
    return [
        "-netdev",
        netdev,
        "-device",
        f"virtio-net-{profile.device_suffix},netdev=net-{nic.id},mac={nic.mac}",
    ]


def _option(path: Path) -> str:
    """A path as a QEMU option value: commas are doubled, as QEMU's parser wants."""
    return str(path).replace(",", ",,")


def _listen(path: Path) -> int:
    """A unix socket listening at path (what a dead VM left there goes first), as a
    descriptor for QEMU to inherit; root's alone (whoever connects drives the VM)."""
    import socket

    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        private.bind(listener, path)
        listener.listen(LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener.detach()


def _file_identity(path: str | Path) -> list[int]:
    """Changes whenever the file is replaced or rewritten (no hashing: this runs per start)."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _in_netns(netns_fd: int, then: Callable[[], None]) -> None:
    linux.setns(netns_fd, linux.CLONE_NEWNET)
    then()


def find_binary(config: VMConfig) -> str:
    profile = profile_for(config)
    binary = shutil.which(profile.binary)
    if binary is None:
        raise VMError(f"{profile.binary} not found on PATH: install QEMU")
    return binary


def template_identity(config: VMConfig) -> dict[str, Any] | None:
    """What a saved state of a VM of config depends on (see VirtualMachine), or None
    (logged) when QEMU or the guest's files cannot be found."""
    try:
        binary = os.path.realpath(find_binary(config))
        # Values that may differ between the template and its restores are replaced by
        # fixed ones (VMConfig.neutral); everything else in the command line counts.
        neutral = config.neutral()
        argv = command_line(neutral, accel.choose(binary), restoring=True)
        files = {str(path): _file_identity(path) for path in (binary, config.kernel, config.initrd)}
    except (VMError, OSError) as error:
        log.info("no template identity for %s: %s", config.name, error)
        return None
    return {"backend": "qemu", "layout": config.layout(), "argv": argv[1:], "files": files}


class QemuLaunch:
    """A QEMU process and what it was launched for: `config` as asked (before the
    machine fallback), and the saved state it restores, if any."""

    def __init__(
        self,
        config: VMConfig,
        restoring: Path | None,
        resolved: VMConfig,
        process: VmmProcess,
        emulated: bool,
        incoming: str | None = None,
        helpers: tuple[VmmProcess, ...] = (),
    ) -> None:
        self.config = config
        self.restoring = restoring
        self.resolved = resolved
        """config with the machine this QEMU offers (with_available_machine)."""
        self.process = process
        self.emulated = emulated
        """The guest's code runs under TCG (see VirtualMachine.emulated)."""
        self.incoming = incoming
        """The `migrate-incoming` URI of the saved state QEMU holds open, if restoring."""
        self.helpers = helpers
        """The processes serving QEMU's vhost-user devices (a virtiofsd per virtiofs
        share), ended with it (end_helpers)."""


def launch(config: VMConfig, restoring: Path | None = None) -> QemuLaunch:
    """QEMU started for config: booting, or waiting to load the state in `restoring`
    (RESTORE_ARGS), open in QEMU as `incoming` says. Returns as soon as the process
    exists, with its sockets listening: they are bound here and QEMU inherits them, so
    nobody waits for QEMU to create them (a connection waits in the backlog until QEMU
    accepts it, or is refused once QEMU is gone)."""
    binary = find_binary(config)
    resolved = with_available_machine(config, binary)
    if resolved.netns is not None and not linux.HAS_NETWORK_NAMESPACES:
        raise VMError(
            f"VM {resolved.name}: network namespace {resolved.netns} asked for, and "
            f"{sys.platform} has none (harpoon's user-mode network needs no namespace)"
        )
    # The VM's sockets, console log and pid file: root's alone. So is the directory of
    # every VM's (RUN_DIR/vm, a template build's scratch), which lists the containers.
    private.directory(resolved.state_dir.parent)
    private.directory(resolved.state_dir)
    inherited: list[int] = []
    helpers = _start_virtiofsd(resolved) if restoring is None else ()
    try:
        # Listening before QEMU connects: its stream netdev connects once as it starts
        # (and retries every second after).
        helpers += start_gvproxies(resolved, "qemu")
        listeners = {
            chardev: _listen(path)
            for chardev, path in zip(
                LISTENER_IDS,
                (resolved.agent_socket, resolved.stdio_socket, resolved.control_socket),
                strict=True,
            )
        }
        inherited += listeners.values()
        argv = command_line(
            resolved,
            accel.choose(binary),
            restoring=restoring is not None,
            listeners=listeners,
        )
        argv[0] = binary
        state_fd = None
        if restoring is not None:
            state_fd = os.open(restoring, os.O_RDONLY | os.O_CLOEXEC)
            inherited.append(state_fd)
            argv += RESTORE_ARGS
        preexec = die_with_parent_at_lowest_priority if resolved.low_priority else die_with_parent
        if resolved.netns is not None:
            # QEMU opens its taps by name: in the namespace they were made in.
            netns_fd = os.open(resolved.netns, os.O_RDONLY | os.O_CLOEXEC)
            inherited.append(netns_fd)
            preexec = functools.partial(_in_netns, netns_fd, preexec)
        process = VmmProcess.spawn(
            argv,
            stderr_path=resolved.state_dir / "vmm.log",
            preexec=preexec,
            pass_fds=tuple(inherited),
        )
    except BaseException:
        for helper in helpers:
            helper.kill()
        raise
    finally:
        for fd in inherited:
            os.close(fd)
    log.debug("QEMU %d launched for %s", process.pid, resolved.name)
    emulated = argv[argv.index("-accel") + 1].startswith("tcg")
    incoming = None if state_fd is None else f"fd:{state_fd}"
    return QemuLaunch(config, restoring, resolved, process, emulated, incoming, helpers)


def _start_virtiofsd(config: VMConfig) -> tuple[VmmProcess, ...]:
    """A virtiofsd for each virtiofs share of config, serving a socket bound here (QEMU
    connects to it as it starts), its pid recorded in the state directory for `delete`
    (harpoon.vmm.leftovers)."""
    shares = [share for share in config.shares if share.fs == "virtiofs"]
    if not shares:
        return ()
    binary = virtiofsd.find()
    if binary is None:
        raise VMError(
            f"VM {config.name}: virtiofsd not found (scripts/install-deps builds it; "
            f"or set {virtiofsd.BINARY_ENV})"
        )
    started: list[VmmProcess] = []
    try:
        for share in shares:
            fd = _listen(virtiofsd.socket_path(config.state_dir, share))
            try:
                process = VmmProcess.spawn(
                    virtiofsd.command_line(binary, share, fd),
                    stderr_path=virtiofsd.log_file(config.state_dir, share),
                    preexec=die_with_parent,
                    pass_fds=(fd,),
                )
            finally:
                os.close(fd)
            started.append(process)
            private.write_file(
                virtiofsd.pid_file(config.state_dir, share), f"{process.pid}\n".encode()
            )
    except BaseException:
        for process in started:
            process.kill()
        raise
    return tuple(started)


async def end_helpers(launched: QemuLaunch) -> None:
    """Ends the launch's helper processes (once QEMU is gone they exit by themselves;
    this makes sure, and waits) and removes their sockets."""
    for helper in launched.helpers:
        helper.kill()
        await helper.wait()
    remove_gvproxy_files(launched.resolved)
    for share in launched.resolved.shares:
        if share.fs == "virtiofs":
            for path in (
                virtiofsd.socket_path(launched.resolved.state_dir, share),
                virtiofsd.pid_file(launched.resolved.state_dir, share),
            ):
                path.unlink(missing_ok=True)


class Prelaunched(prelaunch.Prelaunched[QemuLaunch]):
    """A QEMU launched ahead of the QemuVM that will run it (harpoon.vmm.prelaunch): it
    fits a launch of the same config restoring the same saved state."""

    def __init__(self, launched: QemuLaunch) -> None:
        super().__init__(launched, _end, "QEMU")

    async def take(self, config: VMConfig, restoring: Path | None) -> QemuLaunch | None:
        return await self.take_if(
            lambda ahead: ahead.config == config and ahead.restoring == restoring
        )


async def _end(launched: QemuLaunch) -> None:
    # Killed, not shut down: it never ran a guest anyone used.
    launched.process.kill()
    await launched.process.wait()
    await end_helpers(launched)
