"""The double's processes and sockets: QEMU, its helper daemons, the NICs' sockets.

Every process the double starts gets a parent-death signal (SIGKILL when the double
dies, however it dies) and a session of its own (a ^C meant for the double, which stops
the VM gracefully, must not reach QEMU). The double's private files (QMP's socket,
the vhost-user sockets, vhost-device-vsock's unix socket) live in a directory of their
own under the temporary directory, removed when the double exits -- even killed (a
harpoon shim gives its vfkit SIGKILL when it dies): a janitor, a shell blocked reading a
pipe only the double holds, removes it when that pipe closes. Should the janitor be
killed too, the next double removes what is left (as vfkit removes stale cloud-init
images: pkg/util CleanupStaleCloudInitISO).

vhost-device-vsock (rust-vmm, `cargo install`ed by scripts/install-deps:
harpoon.devenv.tools VHOST_DEVICE_VSOCK) serves the VM's vsock over vhost-user; it
binds its socket itself, so QEMU is started once that socket exists.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from harpoon import linux
from harpoon.devenv import host, tools
from harpoon.devenv.vfkit_double import devices
from harpoon.vmm import virtiofsd
from harpoon.vmm.devices import Share

PRIVATE_PREFIX = "vfkit-double-"
VSOCK_BINARY_ENV = "HARPOON_VHOST_DEVICE_VSOCK"
#: vhost-device-vsock binds its socket in a few milliseconds; this catches a hung one.
VSOCK_SOCKET_TIMEOUT_S = 10.0
VSOCK_SOCKET_POLL_S = 0.005
#: VZ's guest CID as seen by the guest (vfkit doc/usage.md: `nc --vsock --listen 3 6`).
GUEST_CID = 3
LISTEN_BACKLOG = 4
# pkg/vf/virtionet.go: its datagram socket's buffers, and the unixgram path limit.
NIC_SNDBUF_BYTES = 1 * 1024 * 1024
NIC_RCVBUF_BYTES = 4 * 1024 * 1024
MAX_UNIXGRAM_PATH_BYTES = 104
VFKIT_MAGIC = b"VFKT"


class LaunchError(RuntimeError):
    """Something the VM needs could not be started or connected."""


def _die_with_the_double() -> None:
    # In the forked child before exec: import nothing (another thread may hold a lock).
    linux.set_parent_death_signal(signal.SIGKILL)
    os.setsid()


def spawn(argv: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """argv started with the double's stderr as its stdout and stderr."""
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=2,
            preexec_fn=_die_with_the_double,
            pass_fds=pass_fds,
        )
    except OSError as error:
        raise LaunchError(f"could not start {argv[0]}: {error}") from None


def private_dir() -> Path:
    """A new directory for the double's own sockets, after removing those of doubles
    that are gone."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob(f"{PRIVATE_PREFIX}*"):
        match = re.match(rf"{PRIVATE_PREFIX}(\d+)-", stale.name)
        if match and not host.alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=base))


#: Blocks until its stdin ends (the double is gone, however it went), then removes $0.
JANITOR_SCRIPT = 'read -r _; exec rm -rf -- "$0"'


def start_janitor(directory: Path) -> subprocess.Popen[bytes]:
    """The janitor of `directory` (see the module's doc). It must outlive the double: no
    parent-death signal; a session of its own, so that the double's group is not its."""
    try:
        return subprocess.Popen(
            ["/bin/sh", "-c", JANITOR_SCRIPT, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as error:
        raise LaunchError(f"could not start the janitor of {directory}: {error}") from None


def end_janitor(janitor: subprocess.Popen[bytes]) -> None:
    """Lets the janitor do its work now and waits for it (the double is exiting)."""
    if janitor.stdin is not None:
        janitor.stdin.close()
    janitor.wait()


def listen(path: Path) -> socket.socket:
    """A unix stream socket listening at path (for a child to inherit)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


def start_virtiofsd(share: devices.VirtioFs, socket_path: Path) -> subprocess.Popen[bytes]:
    """virtiofsd serving share's directory, read-write (as VZ always shares it), on a
    socket bound here and inherited (QEMU may connect before virtiofsd runs)."""
    binary = virtiofsd.find()
    if binary is None:
        raise LaunchError(
            f"virtiofsd not found (scripts/install-deps builds it; or set {virtiofsd.BINARY_ENV})"
        )
    listener = listen(socket_path)
    with listener:
        # The tag is QEMU's business, not virtiofsd's: Share wants one, any will do.
        served = Share("share", Path(share.shared_dir), "virtiofs", read_only=False)
        argv = virtiofsd.command_line(binary, served, listener.fileno())
        return spawn(argv, pass_fds=(listener.fileno(),))


def vhost_device_vsock() -> str:
    """The vhost-device-vsock to run: $HARPOON_VHOST_DEVICE_VSOCK, the tools cache's,
    PATH's."""
    named = os.environ.get(VSOCK_BINARY_ENV)
    candidates = [named] if named else [str(tools.VHOST_DEVICE_VSOCK.binary), "vhost-device-vsock"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise LaunchError(
        f"vhost-device-vsock not found (scripts/install-deps builds "
        f"{tools.VHOST_DEVICE_VSOCK.pin}; or set {VSOCK_BINARY_ENV})"
    )


def start_vsock_device(socket_path: Path, uds: Path) -> subprocess.Popen[bytes]:
    """vhost-device-vsock for the guest (CID 3), its vhost-user socket at socket_path and
    its host side at uds; returns once the vhost-user socket exists."""
    argv = [
        vhost_device_vsock(),
        "--vm",
        f"guest-cid={GUEST_CID},socket={socket_path},uds-path={uds}",
    ]
    process = spawn(argv)
    # It binds the socket itself (no --fd option): wait for the file, bounded.
    deadline = time.monotonic() + VSOCK_SOCKET_TIMEOUT_S
    while not _is_socket(socket_path):
        if process.poll() is not None:
            raise LaunchError(f"vhost-device-vsock exited with status {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise LaunchError(
                f"vhost-device-vsock made no {socket_path} in {VSOCK_SOCKET_TIMEOUT_S} s"
            )
        time.sleep(VSOCK_SOCKET_POLL_S)
    return process


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def random_mac() -> str:
    """A random locally administered unicast MAC (VZ's randomLocallyAdministeredAddress)."""
    octets = [random.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


def connect_nic(nic: devices.VirtioNet) -> tuple[socket.socket, Path | None]:
    """The connected datagram socket of a NIC, and the path vfkit bound it to (removed
    when it exits). pkg/vf/virtionet.go connectUnixPath: bind a socket named
    vfkit-<pid>-<random>.sock beside the peer's, connect to the peer, set the buffers,
    send "VFKT" first unless vfkitMagic=off."""
    if nic.fd is not None:
        return _inherited_nic(nic.fd), None
    peer = Path(nic.unix_socket_path)
    local = peer.parent / f"vfkit-{os.getpid():x}-{random.randrange(0xFFFF):x}.sock"
    if len(str(local).encode()) >= MAX_UNIXGRAM_PATH_BYTES:
        length = len(str(local).encode())
        raise LaunchError(
            f"unixgram path '{local}' is too long: {length} >= {MAX_UNIXGRAM_PATH_BYTES} bytes"
        )
    datagrams = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        datagrams.bind(str(local))
        datagrams.connect(str(peer))
        datagrams.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, NIC_SNDBUF_BYTES)
        datagrams.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NIC_RCVBUF_BYTES)
        if nic.vfkit_magic:
            datagrams.send(VFKIT_MAGIC)
    except OSError as error:
        datagrams.close()
        with contextlib.suppress(FileNotFoundError):
            local.unlink()
        raise LaunchError(
            f"dial unixgram {local}->{peer}: connect: {error.strerror or error}"
        ) from None
    return datagrams, local


def _inherited_nic(fd: int) -> socket.socket:
    try:
        datagrams = socket.socket(fileno=os.dup(fd))
    except OSError as error:
        raise LaunchError(f"virtio-net fd={fd}: {error.strerror or error}") from None
    if datagrams.type != socket.SOCK_DGRAM:
        datagrams.close()
        raise LaunchError(f"virtio-net fd={fd} is not a datagram socket")
    return datagrams


def end(process: subprocess.Popen[bytes]) -> None:
    """Kills process (if still running) and reaps it."""
    if process.poll() is None:
        process.kill()
    process.wait()
