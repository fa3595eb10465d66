"""The vfkit double runs harpoon's guest for real: a console log, a virtio-fs share, a
virtio-blk disk found by its serial, a NIC on vfkit's unixgram protocol, vsock both ways
through vhost-device-vsock, and vfkit's REST API and lifecycle around them.

The guest is harpoon's image with another /init (the agent does not listen on vsock
yet) and with the kernel's vsock modules, which the image does not ship yet, taken
from the same kernel package: the /init loads the drivers, checks each device, reports
on hvc0 (the console log) and serves an echo on vsock port 1025.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harpoon.devenv import host as host_processes
from harpoon.devenv.vfkit_double import install_wrapper, launch, rest
from harpoon.guest import GuestImage, build_guest, debian, initramfs, kernel
from harpoon.guest.cache import cache_root
from harpoon.vmm import virtiofsd

pytestmark = pytest.mark.vm

ECHO_PORT = 1025  # the guest listens
TO_HOST_PORT = 1026  # the guest connects (vfkit's `listen` mode)
SILENT_PORT = 1027  # nobody listens
GUEST_MAC = "5a:94:ef:e4:0c:ee"
ETHERTYPE = 0x88B5  # IEEE 802 local experimental
VSOCK_MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")
MARKER = "DOUBLE-TEST"
BOOT_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 30.0
#: vfkit's 5 s grace after a stop request, then the hard stop, then the double's exit.
STOP_TIMEOUT_S = 30.0

GUEST_INIT = f"""#!/usr/bin/python3 -SB
import json, os, select, socket, threading, time, traceback
from harpoon import linux
from harpoon.agent import boot

def say(text):
    # Not print(): PID 1 started with no console (hvc0 came with its module), so Python
    # has no sys.stdout; fd 1 is hvc0 once main() has opened it.
    os.write(1, f"{MARKER} {{text}}\\n".encode())

def echo(connection):
    # Until the guest's side ends: a host's close is not passed on by vfkit (see
    # harpoon.devenv.vfkit_double.vsock), so this thread may outlive it.
    with connection:
        while data := connection.recv(65536):
            connection.sendall(data)

def main():
    boot.mount_base_filesystems()
    closures = json.load(open("/etc/harpoon/modules.json"))
    for name in ("virtio_mmio", "virtio_console", "virtio_blk", "virtiofs", "virtio_net"):
        for path in closures[name]:
            linux.load_module(path)
    for name in {VSOCK_MODULES!r}:
        linux.load_module(f"/lib/modules/vsock/{{name}}.ko")
    for _ in range(1000):  # hvc0 appears once virtio_console has probed the port
        try:
            console = os.open("/dev/hvc0", os.O_WRONLY)
            break
        except OSError:
            time.sleep(0.01)
    os.dup2(console, 1)
    os.dup2(console, 2)
    say("booted")
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("vd"):
            serial = open(f"/sys/block/{{name}}/serial").read().strip()
            head = open(f"/dev/{{name}}", "rb").read(16)
            say(f"disk {{name}} serial={{serial}} head={{head.decode(errors='replace')}}")
    os.makedirs("/mnt/share")
    linux.mount("share0", "/mnt/share", "virtiofs")
    say("share holds " + open("/mnt/share/from-host").read())
    with open("/mnt/share/from-guest", "w") as written:
        written.write("written in the guest")
    linux.set_interface_up("eth0")
    mac = open("/sys/class/net/eth0/address").read().strip()
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons({ETHERTYPE}))
    raw.bind(("eth0", 0))
    frame = b"\\xff" * 6 + bytes.fromhex(mac.replace(":", "")) + (
        {ETHERTYPE}).to_bytes(2, "big") + b"GUEST-FRAME from " + mac.encode()
    raw.send(frame)
    say(f"nic {{mac}} sent a frame")
    server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    server.bind((socket.VMADDR_CID_ANY, {ECHO_PORT}))
    server.listen(4)
    say("vsock listening")
    for _ in range(100):
        try:
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as out:
                out.connect((2, {TO_HOST_PORT}))
                out.sendall(b"hello from the guest")
            break
        except OSError as error:
            time.sleep(0.1)
    while True:
        ready, _, _ = select.select([server, raw], [], [])
        if server in ready:
            connection, peer = server.accept()
            threading.Thread(target=echo, args=(connection,), daemon=True).start()
        if raw in ready:
            got = raw.recv(2048)
            if b"HOST-FRAME" in got:
                say("frame from the host: " + got[14:].decode(errors="replace"))

try:
    main()
except BaseException:
    say("failed: " + traceback.format_exc().replace("\\n", " | "))
    while True:
        time.sleep(60)
"""


def vsock_modules(image: GuestImage, directory: Path) -> list[initramfs.Entry]:
    """The vsock modules of the image's kernel, from the kernel package it was built from."""
    debs = cache_root() / "debs" / image.arch
    found = sorted(debs.glob(f"linux-image-{image.kernel_release}_*.deb"))
    if not found:
        pytest.fail(f"no linux-image-{image.kernel_release} package in {debs}")
    wanted = {f"{name}.ko" for name in VSOCK_MODULES} | {f"{n}.ko.xz" for n in VSOCK_MODULES}
    entries = []
    with debian.data_tar(found[-1]) as archive:
        for member in archive.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if base in wanted:
                file = archive.extractfile(member)
                assert file is not None
                (directory / base).write_bytes(file.read())
                name = kernel.module_name(base)
                elf = kernel.strip_signature(kernel.decompress_module(directory / base), name)
                entries.append(initramfs.file(f"lib/modules/vsock/{name}.ko", elf))
    assert len(entries) == len(VSOCK_MODULES), f"vsock modules missing from {found[-1]}"
    return entries


@pytest.fixture(scope="module")
def test_guest(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    image = build_guest("amd64")
    directory = tmp_path_factory.mktemp("guest")
    entries = dict(initramfs.read(image.initrd.read_bytes()))
    entries["init"] = initramfs.file("init", GUEST_INIT.encode(), 0o755)
    for entry in vsock_modules(image, directory):
        entries[entry.path] = entry
    initrd = directory / "initrd.cpio"
    initrd.write_bytes(initramfs.write(entries.values()))
    return dataclasses.replace(image, initrd=initrd)


def needs(what: str, present: bool) -> None:
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"needs {what}")
        pytest.skip(f"needs {what} (scripts/install-deps)")


@dataclass
class Host:
    """The programs on the host side of the VM: what harpoon, gvproxy and a guest-facing
    service would be."""

    directory: Path
    nic: socket.socket
    to_host: socket.socket
    double: subprocess.Popen[bytes] | None = None

    @property
    def rest(self) -> str:
        return str(self.directory / "rest.sock")

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    def state(self) -> str:
        status, answer = rest.call(self.rest, "GET", "/vm/state")
        assert status == 200
        return str(answer["state"])

    def change(self, state: str) -> tuple[int, object]:
        return rest.call(self.rest, "POST", "/vm/state", {"state": state})

    def wait_for_console(self, text: str, timeout_s: float = STEP_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            console = self.console.read_text(errors="replace")
            assert f"{MARKER} failed" not in console, console
            if text in console:
                return console
            if self.double is not None and self.double.poll() is not None:
                break
            time.sleep(0.1)
        vfkit_log = (self.directory / "vfkit.log").read_text(errors="replace")
        raise AssertionError(
            f"no {text!r} on the console:\n{self.console.read_text()}\nvfkit's log:\n{vfkit_log}"
        )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "from-host").write_text("written on the host")
    (tmp_path / "disk.img").write_bytes(b"DISK-CONTENT-OK!" + bytes(1 << 20))
    nic = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # gvproxy -listen-vfkit's end
    nic.bind(str(tmp_path / "net.sock"))
    to_host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a host service
    to_host.bind(str(tmp_path / "host.sock"))
    to_host.listen(1)
    with nic, to_host:
        yield Host(tmp_path, nic, to_host)


def vfkit_line(guest: GuestImage, host: Host) -> list[str]:
    d = host.directory
    return [
        "--cpus", "1", "--memory", "512",
        "--bootloader",
        f'linux,kernel={guest.kernel},initrd={guest.initrd},cmdline="console=hvc0 panic=-1"',
        "--device", f"virtio-serial,logFilePath={host.console}",
        "--device", f"virtio-vsock,port={ECHO_PORT},socketURL={d}/agent.sock,connect",
        "--device", f"virtio-vsock,port={SILENT_PORT},socketURL={d}/silent.sock,connect",
        "--device", f"virtio-vsock,port={TO_HOST_PORT},socketURL={d}/host.sock,listen",
        "--device", f"virtio-fs,sharedDir={d}/share,mountTag=share0",
        "--device", f"virtio-blk,path={d}/disk.img,deviceId=disk-0",
        "--device", f"virtio-net,unixSocketPath={d}/net.sock,mac={GUEST_MAC}",
        "--restful-uri", f"unix://{host.rest}",
        "--pidfile", f"{d}/vmm.pid",
    ]  # fmt: skip


def dial(path: Path, message: bytes) -> bytes:
    """A host program's connection through a vsock socket: sends message (from a thread:
    an echo answers while it is sent), reads as much back or to the end, closes. No
    half-close: vfkit does not pass one on to the guest."""

    def send(connection: socket.socket) -> None:
        with contextlib.suppress(OSError):  # closed on us: what the reader sees says so
            connection.sendall(message)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(STEP_TIMEOUT_S)
        connection.connect(str(path))
        sender = threading.Thread(target=send, args=(connection,))
        sender.start()
        received = b""
        try:
            while len(received) < len(message) and (chunk := connection.recv(65536)):
                received += chunk
        finally:
            sender.join(STEP_TIMEOUT_S)
        return received


def gone(pid: int) -> bool:
    return not host_processes.alive(pid)


def children_of(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found[int(entry.name)] = (entry / "comm").read_text().strip()
            except (OSError, IndexError):
                continue
    return found


def wait_for(check: Callable[[], bool], timeout_s: float = STEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {check}")


def needs_the_double() -> None:
    needs("qemu-system-x86_64", shutil.which("qemu-system-x86_64") is not None)
    needs("virtiofsd", virtiofsd.find() is not None)
    try:
        launch.vhost_device_vsock()
    except launch.LaunchError as error:
        needs(str(error), False)


@dataclass(frozen=True)
class Running:
    """A double whose VM is Running: its pid, the processes it started, its directory."""

    pid: int
    helpers: dict[int, str]
    private: Path


def wait_running(host: Host, pid: int) -> Running:
    wait_for(lambda: os.path.exists(host.rest) and host.state() == "VirtualMachineStateRunning")
    helpers = children_of(pid)
    # QEMU, one virtiofsd per share, vhost-device-vsock, the janitor of its directory.
    assert sorted(helpers.values()) == ["qemu-system-x86", "sh", "vhost-device-vs", "virtiofsd"]
    (private,) = Path(tempfile.gettempdir()).glob(f"{launch.PRIVATE_PREFIX}{pid}-*")
    return Running(pid, helpers, private)


def sockets_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.is_socket())


def test_the_double_runs_harpoons_guest_with_vfkits_devices_and_api(
    test_guest: GuestImage, host: Host
) -> None:
    needs_the_double()
    vfkit = install_wrapper(host.directory / "bin")
    timings: dict[str, float] = {}
    started = time.monotonic()
    with open(host.directory / "vfkit.log", "wb") as log:
        double = subprocess.Popen(
            [vfkit, "--log-level", "debug", *vfkit_line(test_guest, host)], stderr=log
        )
    host.double = double
    try:
        running = wait_running(host, double.pid)
        timings["launch to Running"] = time.monotonic() - started
        assert (host.directory / "vmm.pid").read_text() == str(double.pid)

        # REST: pause and resume change the state, as VZ names it.
        assert host.change("Pause") == (202, None)
        assert host.state() == "VirtualMachineStatePaused"
        assert host.change("Pause")[0] == 500  # VZ refuses to pause a paused VM
        assert host.change("Resume") == (202, None)
        assert host.state() == "VirtualMachineStateRunning"
        _, inspected = rest.call(host.rest, "GET", "/vm/inspect")
        assert isinstance(inspected, dict) and inspected["vcpus"] == 1

        # The NIC: vfkit's magic first, on the socket vfkit bound beside gvproxy's.
        host.nic.settimeout(STEP_TIMEOUT_S)
        magic, double_end = host.nic.recvfrom(65536)
        assert magic == b"VFKT"
        assert Path(double_end).name.startswith(f"vfkit-{double.pid:x}-")

        console = host.wait_for_console(f"{MARKER} vsock listening", BOOT_TIMEOUT_S)
        timings["launch to guest vsock listening"] = time.monotonic() - started
        assert f"{MARKER} disk vda serial=disk-0 head=DISK-CONTENT-OK!" in console
        assert f"{MARKER} share holds written on the host" in console
        assert (host.directory / "share" / "from-guest").read_text() == "written in the guest"
        assert f"{MARKER} nic {GUEST_MAC} sent a frame" in console
        frame = b""
        while b"GUEST-FRAME" not in frame:
            frame = host.nic.recv(65536)
        assert frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", ""))
        reply = bytes.fromhex(GUEST_MAC.replace(":", "")) + bytes(6)
        host.nic.sendto(reply + ETHERTYPE.to_bytes(2, "big") + b"HOST-FRAME hello", double_end)
        host.wait_for_console(f"{MARKER} frame from the host: HOST-FRAME hello")

        # vsock, host -> guest: a port nobody listens on is a closed connection, the
        # guest's echo port answers through the socket vfkit listens on.
        assert dial(host.directory / "silent.sock", b"anyone?") == b""
        timed = time.monotonic()
        payload = os.urandom(4 << 20)
        assert dial(host.directory / "agent.sock", payload) == payload
        timings["4 MiB echoed over vsock"] = time.monotonic() - timed
        # vsock, guest -> host: the guest reached the host service at socketURL.
        host.to_host.settimeout(STEP_TIMEOUT_S)
        accepted, _ = host.to_host.accept()
        with accepted:
            accepted.settimeout(STEP_TIMEOUT_S)
            assert accepted.recv(100) == b"hello from the guest"

        # SIGTERM: a stop request, 5 s for the guest, a hard stop, status 0, nothing left.
        stopping = time.monotonic()
        double.send_signal(signal.SIGTERM)
        assert double.wait(STOP_TIMEOUT_S) == 0
        timings["SIGTERM to exit"] = time.monotonic() - stopping
    finally:
        if double.poll() is None:
            double.kill()
            double.wait()

    wait_for(lambda: all(gone(pid) for pid in running.helpers))
    assert sockets_in(host.directory) == ["host.sock", "net.sock"]  # the host's own
    assert not running.private.exists()
    assert (host.directory / "vmm.pid").exists()  # vfkit never removes its pid file
    print(" | ".join(f"{step}: {seconds:.2f} s" for step, seconds in timings.items()))


#: The launcher: starts the double (with a parent-death signal if argv[1] names one),
#: prints its pid, then waits to be killed.
SPAWNER = """
import ctypes, signal, subprocess, sys, time
death = int(sys.argv[1])
def die_with_me():
    if death:
        ctypes.CDLL(None).prctl(1, death, 0, 0, 0)  # PR_SET_PDEATHSIG
print(subprocess.Popen(sys.argv[2:], preexec_fn=die_with_me).pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("death_signal", [0, signal.SIGKILL], ids=["own-sigterm", "sigkill"])
def test_a_double_whose_parent_is_killed_ends_and_leaves_what_vfkit_would(
    test_guest: GuestImage, host: Host, death_signal: int
) -> None:
    """A shim killed with SIGKILL. Launched without a parent-death signal, the double
    takes SIGTERM (its own choice) and goes the way of a SIGTERM: VM stopped, every file
    removed. Launched as harpoon's backend launches it (SIGKILL), it is killed: QEMU and
    the daemons die with it, its janitor removes its directory, and the sockets vfkit
    itself would have removed stay, as a killed vfkit leaves them."""
    needs_the_double()
    vfkit = install_wrapper(host.directory / "bin")
    with open(host.directory / "vfkit.log", "wb") as log:
        parent = subprocess.Popen(
            [sys.executable, "-c", SPAWNER, str(int(death_signal)), vfkit,
             *vfkit_line(test_guest, host)],
            stdout=subprocess.PIPE,
            stderr=log,
        )  # fmt: skip
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        running = wait_running(host, pid)
        wait_for(lambda: (host.directory / "agent.sock").exists())
        parent.kill()
        parent.wait()
        wait_for(lambda: gone(pid), STOP_TIMEOUT_S)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()

    wait_for(lambda: all(gone(helper) for helper in running.helpers))
    wait_for(lambda: not running.private.exists())
    left = sockets_in(host.directory)
    if not death_signal:
        assert left == ["host.sock", "net.sock"]
        assert "captured signal" in (host.directory / "vfkit.log").read_text()
    else:
        assert {"agent.sock", "rest.sock", "silent.sock"} <= set(left)
        assert any(name.startswith(f"vfkit-{pid:x}-") for name in left)  # the NIC's


def test_a_hard_stop_through_rest_ends_the_double_with_status_0(
    test_guest: GuestImage, host: Host
) -> None:
    """HardStop (VZ's stop()): the VM ends at once, vfkit exits 0, its files go."""
    needs_the_double()
    vfkit = install_wrapper(host.directory / "bin")
    with open(host.directory / "vfkit.log", "wb") as log:
        double = subprocess.Popen([vfkit, *vfkit_line(test_guest, host)], stderr=log)
    try:
        running = wait_running(host, double.pid)
        assert host.change("HardStop") == (202, None)
        assert double.wait(STEP_TIMEOUT_S) == 0
    finally:
        if double.poll() is None:
            double.kill()
            double.wait()

    wait_for(lambda: all(gone(pid) for pid in running.helpers))
    assert sockets_in(host.directory) == ["host.sock", "net.sock"]
    assert not running.private.exists()
