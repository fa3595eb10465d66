"""The vfkit command line and its launch: everything up to a vfkit process running.

vfkit (crc-org/vfkit, macOS) runs one Virtualization.framework VM per process, and is
driven by its command line and a small REST API (harpoon.vmm.vfkit_api). What harpoon
gives it (doc/usage.md, pkg/config/virtio.go, pkg/vf/vsock.go of vfkit 0.6):

    vfkit --cpus N --memory MIB
      --bootloader linux,kernel=K,initrd=I,cmdline="console=hvc0 ..."
      --device virtio-serial,logFilePath=STATE/console.log
      --device virtio-vsock,port=1025,socketURL=STATE/agent.sock,connect
      --device virtio-vsock,port=1026,socketURL=STATE/stdio.sock,connect
      --device virtio-fs,sharedDir=DIR,mountTag=TAG          (a share)
      --device virtio-blk,path=IMG,deviceId=ID[,readonly]     (a disk)
      --device virtio-net,unixSocketPath=SOCK,mac=MAC         (a NIC: its gvproxy)
      --restful-uri unix://STATE/vfkit-rest.sock

What that means for a VM (`fit` makes a config say it, `command_line` refuses the rest
with a VMError naming what cannot be had):
- The agent channel is two vsock ports, not virtio-serial ports: VZ has no named
  ports. In `connect` mode vfkit listens on the unix socket once the VM runs and dials
  the guest's port for each connection, closing it if the guest does not listen yet
  (the host retries: harpoon.sandbox.agent_client). The guest picks the transport by
  what the VM has (harpoon.agent.main).
- Shares are virtiofs (VZ has no 9p) and always writable: vfkit has no read-only
  share, so `fit` serves a read-only one writable (Share.read_only: the guest mounts it
  read-only: a read-only bind's share, harpoon.sandbox.bind_shares, and crun's `ro`
  bind), and `check` refuses one given to it as it is.
- A NIC is a gvproxy of the VM's own (`-listen-vfkit`): vfkit opens no tap device and
  speaks no stream socket; macOS's NAT is not used.
- The guest's console is a virtio console (`console=hvc0`), logged to console.log.
- The kernel is the guest image's: on arm64 an uncompressed Image, as vfkit requires
  (check_guest says so before vfkit does); on amd64 the ELF vmlinux harpoon extracts for
  QEMU's PVH entry, which VZ on an Intel Mac is not known to boot (Apple's own x86 guests
  use a bzImage): unverified, as is everything here on a real Mac.
- Values are split at commas by vfkit and taken as they are: a path with a comma, or a
  kernel argument with a double quote (the command line is quoted), cannot be given.

Nothing here needs an event loop: a shim launches its VM before it loads asyncio
(harpoon.shim.daemon), and VfkitVM (harpoon.vmm.vfkit) carries on with the process.
On Linux vfkit gets SIGKILL when its parent thread dies, as QEMU does; macOS has no
parent-death signal, so a vfkit whose shim was killed runs on until `shim delete` ends
it from its pid file (harpoon.vmm.leftovers).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

from harpoon import private
from harpoon.api.names import AGENT_VSOCK_PORT, STDIO_VSOCK_PORT
from harpoon.vmm import prelaunch
from harpoon.vmm.backend import host_arch
from harpoon.vmm.base import VMConfig, VMError
from harpoon.vmm.devices import NIC, Disk, Share, StreamBackend, TapBackend
from harpoon.vmm.gvproxy_nics import gvproxy_config, start_gvproxies
from harpoon.vmm.kernel_args import BASE_KERNEL_ARGS
from harpoon.vmm.process import VmmProcess, die_with_parent, die_with_parent_at_lowest_priority

log = logging.getLogger(__name__)

PROGRAM = "vfkit"
#: Names the vfkit program to run (harpoon's test double on Linux), over the config
#: file's and PATH's.
PROGRAM_ENV = "HARPOON_VFKIT"
REST_SOCKET_NAME = "vfkit-rest.sock"
CONSOLE = "hvc0"
#: The arm64 Image header's magic ("ARMd" at 0x38): vfkit refuses an arm64 kernel
#: without it ("kernel must be uncompressed", pkg/vf/bootloader.go).
ARM64_IMAGE_MAGIC = b"ARMd"
ARM64_IMAGE_MAGIC_OFFSET = 0x38
#: Characters a socket path may hold: vfkit makes a URL of it (`unix://:PATH`) and
#: listens on its escaped path, so anything URL-escaping changes names another file.
_URL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-~")
IS_MACOS = sys.platform == "darwin"


def find_program(configured: str | None = None) -> str | None:
    """The vfkit to run: $HARPOON_VFKIT, else `configured` (harpoon's config file), else
    PATH's; None when there is none (or the one named cannot be run)."""
    named = os.environ.get(PROGRAM_ENV) or configured
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which(PROGRAM)


def rest_socket(config: VMConfig) -> Path:
    """vfkit's REST API (`--restful-uri unix://...`)."""
    return config.state_dir / REST_SOCKET_NAME


def fit(config: VMConfig) -> VMConfig:
    """config as vfkit runs it: every share virtiofs and writable (vfkit has no
    read-only share: what harpoon shares read-only, a read-only bind's share, the guest
    mounts read-only: harpoon.sandbox.bind_shares). VMError for what vfkit cannot give
    it (see the module's docstring); cheap, no I/O."""
    fitted = dataclasses.replace(
        config,
        shares=tuple(
            dataclasses.replace(share, fs="virtiofs", read_only=False) for share in config.shares
        ),
    )
    check(fitted)
    return fitted


def check(config: VMConfig) -> None:
    """Raises VMError, naming the device, for what a vfkit VM cannot have."""
    name = f"VM {config.name}"
    if config.machine is not None:
        raise VMError(f"{name}: machine {config.machine!r} is QEMU's; vfkit has no machine types")
    if config.memory_file is not None:
        raise VMError(f"{name}: vfkit cannot keep guest RAM in a file (no templates: vfkit #449)")
    if config.vsock is not None:
        raise VMError(
            f"{name}: vfkit's one vsock device carries the agent channel, and its guest CID "
            f"is not the host's to choose (asked for CID {config.vsock.cid})"
        )
    for share in config.shares:
        _check_share(name, share)
    for nic in config.nics:
        _check_nic(name, nic)
    for arg in config.kernel_args:
        if '"' in arg:
            raise VMError(
                f"{name}: kernel argument {arg!r}: vfkit's quoted cmdline cannot hold '\"'"
            )


def _check_share(name: str, share: Share) -> None:
    if share.fs != "virtiofs":
        raise VMError(
            f"{name}: share {share.tag} is {share.fs}; vfkit serves virtiofs only "
            "(VfkitBackend.fit makes every share virtiofs)"
        )
    if share.read_only:
        raise VMError(
            f"{name}: share {share.tag} is read-only, and vfkit shares are always writable "
            "(vfkit has no read-only virtio-fs): mount it read-only in the guest instead"
        )


def _check_nic(name: str, nic: NIC) -> None:
    backend = nic.backend
    if isinstance(backend, TapBackend):
        raise VMError(
            f"{name}: NIC {nic.id} is tap device {backend.ifname}; vfkit opens no tap: it "
            "attaches a NIC to a gvproxy of the VM's own (-listen-vfkit) or to macOS's NAT"
        )
    if isinstance(backend, StreamBackend) and not backend.gvproxy:
        raise VMError(
            f"{name}: NIC {nic.id} is a stream socket ({backend.socket}); vfkit speaks "
            "unixgram only: give it a gvproxy of the VM's own (StreamBackend(gvproxy=True))"
        )


def kernel_command_line(config: VMConfig) -> str:
    return " ".join((f"console={CONSOLE}", *BASE_KERNEL_ARGS, *config.kernel_args))


def command_line(config: VMConfig, program: str = PROGRAM) -> list[str]:
    """The full vfkit argv for config (pure: no I/O); VMError for what vfkit cannot run."""
    check(config)
    bootloader = ",".join(
        (
            "linux",
            f"kernel={_value(config.kernel, 'kernel')}",
            f"initrd={_value(config.initrd, 'initrd')}",
            # Quoted: vfkit splits the option at commas outside double quotes.
            f'cmdline="{kernel_command_line(config)}"',
        )
    )
    args = [
        program,
        "--cpus", str(config.cpus),
        "--memory", str(config.memory_mib),
        "--bootloader", bootloader,
        "--device", f"virtio-serial,logFilePath={_value(config.console_log, 'console log')}",
        "--device", _vsock(AGENT_VSOCK_PORT, config.agent_socket),
        "--device", _vsock(STDIO_VSOCK_PORT, config.stdio_socket),
    ]  # fmt: skip
    for share in config.shares:
        args += ["--device", _share(share)]
    for disk in config.disks:
        args += ["--device", _disk(disk)]
    for nic in config.nics:
        args += ["--device", _nic(nic, config.state_dir)]
    args += ["--restful-uri", f"unix://{_socket_value(rest_socket(config), 'REST socket')}"]
    return args


def _vsock(port: int, socket: Path) -> str:
    return f"virtio-vsock,port={port},socketURL={_socket_value(socket, 'vsock socket')},connect"


def _share(share: Share) -> str:
    return (
        f"virtio-fs,sharedDir={_value(share.host_path, f'share {share.tag}')},mountTag={share.tag}"
    )


def _disk(disk: Disk) -> str:
    # The deviceId is VZ's blockDeviceIdentifier: the guest reads it as the disk's
    # virtio serial, which is how it finds the disk (harpoon.agent.devices).
    option = f"virtio-blk,path={_value(disk.image, f'disk {disk.id}')},deviceId={disk.id}"
    return option + ",readonly" if disk.read_only else option


def _nic(nic: NIC, state_dir: Path) -> str:
    # Only gvproxy NICs pass check(): a gvproxy of the VM's own, in its state directory.
    socket = gvproxy_config(state_dir, nic, "vfkit").net_socket
    return f"virtio-net,unixSocketPath={_socket_value(socket, f'NIC {nic.id}')},mac={nic.mac}"


def _value(path: Path, what: str) -> str:
    text = str(path)
    if "," in text:
        raise VMError(f"{what} {text}: vfkit splits its options at commas; use a path without")
    return text


def _socket_value(path: Path, what: str) -> str:
    text = _value(path, what)
    if not set(text) <= _URL_SAFE:
        raise VMError(
            f"{what} {text}: vfkit makes a URL of a socket path; use one of letters, digits "
            "and /._-~ only"
        )
    return text


def check_guest(config: VMConfig) -> None:
    """What vfkit would refuse of the guest's files, said before it starts: an arm64
    kernel must be an uncompressed Image; Virtualization.framework runs guests of the
    host's architecture only."""
    if IS_MACOS and config.arch != host_arch():
        raise VMError(
            f"VM {config.name}: an {config.arch} guest on an {host_arch()} Mac: "
            "Virtualization.framework runs guests of the host's architecture only"
        )
    if not config.initrd.is_file():
        raise VMError(f"VM {config.name}: no initrd at {config.initrd}")
    if config.arch == "arm64":
        try:
            with open(config.kernel, "rb") as kernel:
                kernel.seek(ARM64_IMAGE_MAGIC_OFFSET)
                magic = kernel.read(len(ARM64_IMAGE_MAGIC))
        except OSError as error:
            raise VMError(f"VM {config.name}: kernel {config.kernel}: {error}") from None
        if magic != ARM64_IMAGE_MAGIC:
            raise VMError(
                f"VM {config.name}: kernel {config.kernel} is not an uncompressed arm64 "
                "Image, which vfkit requires (kernel must be uncompressed)"
            )


class VfkitLaunch:
    """A vfkit process and what it was launched for (`config` as asked, `resolved` as
    run: harpoon.vmm.vfkit_launch.fit), with the helper processes that end with it (a
    gvproxy per NIC)."""

    def __init__(
        self,
        config: VMConfig,
        resolved: VMConfig,
        process: VmmProcess,
        helpers: tuple[VmmProcess, ...] = (),
    ) -> None:
        self.config = config
        self.resolved = resolved
        self.process = process
        self.helpers = helpers


def launch(config: VMConfig, program: str) -> VfkitLaunch:
    """vfkit started for config, booting. Returns as soon as the process exists: its
    sockets appear once the VM runs (VfkitVM.start waits for the agent's). Its pid goes
    to the state directory's pid file at once, for `shim delete` after a killed shim
    (harpoon.vmm.leftovers), and any gvproxy it needs listens before it starts."""
    resolved = fit(config)
    argv = command_line(resolved, program)
    check_guest(resolved)
    # The VM's sockets, console log and pid file: root's alone, as QEMU's.
    private.directory(resolved.state_dir.parent)
    private.directory(resolved.state_dir)
    # vfkit listens where a dead VM's sockets may still be (Go's net.Listen refuses).
    for stale in (resolved.agent_socket, resolved.stdio_socket, rest_socket(resolved)):
        stale.unlink(missing_ok=True)
    helpers = start_gvproxies(resolved, "vfkit")
    try:
        process = VmmProcess.spawn(
            argv,
            stderr_path=resolved.state_dir / "vmm.log",
            preexec=die_with_parent_at_lowest_priority
            if resolved.low_priority
            else die_with_parent,
        )
        private.write_file(resolved.pid_file, f"{process.pid}\n".encode())
    except BaseException:
        for helper in helpers:
            helper.kill()
        raise
    log.debug("vfkit %d launched for %s", process.pid, resolved.name)
    return VfkitLaunch(config, resolved, process, helpers)


async def end_helpers(launched: VfkitLaunch) -> None:
    """Ends the launch's gvproxies (a vfkit NIC's datagrams never hang up: they do not
    exit by themselves) and removes their files."""
    from harpoon.vmm.gvproxy_nics import remove_gvproxy_files

    for helper in launched.helpers:
        helper.kill()
        await helper.wait()
    remove_gvproxy_files(launched.resolved)


class Prelaunched(prelaunch.Prelaunched[VfkitLaunch]):
    """A vfkit launched ahead of the VfkitVM that will run it (harpoon.vmm.prelaunch): it
    fits a launch of the same config."""

    def __init__(self, launched: VfkitLaunch) -> None:
        super().__init__(launched, _end, "vfkit")

    async def take(self, config: VMConfig) -> VfkitLaunch | None:
        return await self.take_if(lambda ahead: ahead.config == config)


async def _end(launched: VfkitLaunch) -> None:
    # Killed, not stopped: it never ran a guest anyone used.
    launched.process.kill()
    await launched.process.wait()
    await end_helpers(launched)
