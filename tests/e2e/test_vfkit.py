"""harpoon through its vfkit backend, the Mac's way, end to end under a real containerd
2.3 driven by `ctr`: every VM is the vfkit test double's (harpoon.devenv.vfkit_double:
QEMU behind vfkit's command line and REST API, the agent over a real guest vsock,
virtiofs shares), the rootfs is the erofs snapshotter's in block mode (the layer and the
writable ext4 image are the VM's disks, as on a Mac), and binds are shares of their own
(HARPOON_BIND_SHARES=1): nothing is mounted on the host, ever (each container's watch
fails a test on any mount under containerd's directory seen while it ran).

What a user sees is checked: `ctr run` (the guest's kernel, through the double), exec,
signals, stdio, a read-only bind refused in the guest and a read-write one written
through, the erofs rootfs, a port published through gvproxy, nothing left after each
container's delete (nor after its shim was killed), and scripts/macos-smoke.sh's table.

Every VM boots cold (vfkit cannot restore a template: vfkit #449), 4-8 s each under TCG:
one long-running container (`shared`) serves the VMM, exec, bind, erofs and SIGKILL
tests; the SIGKILL test, which ends it, comes last.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harpoon.devenv import vfkit_double
from harpoon.devenv.containerd import EROFS_SNAPSHOTTER, TASK_BUNDLES, Containerd
from harpoon.devenv.tools import EROFS_UTILS, VHOST_DEVICE_VSOCK, scripts_dir
from harpoon.devenv.vfkit_double import launch
from harpoon.net import gvproxy
from harpoon.sandbox import bind_shares
from harpoon.shim import paths
from harpoon.shim.transform.network import PORTS_ANNOTATION
from harpoon.vmm import virtiofsd
from harpoon.vmm.choice import VMM_ENV
from harpoon.vmm.vfkit_api import VfkitApi
from harpoon.vmm.vfkit_launch import PROGRAM_ENV, REST_SOCKET_NAME
from tests.e2e.leaks import VmWatch, loop_backing_files, vm_leaks
from tests.e2e.test_harpoon_run import HARPOON, ctr_command, remove, task_states
from tests.prerequisites import unavailable

pytestmark = pytest.mark.vm

RUN_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
#: How long a container's VM, shim and files get to go once it is deleted.
GONE_TIMEOUT_S = 30.0
SMOKE_TIMEOUT_S = 900.0
DOUBLE_MODULE = "harpoon.devenv.vfkit_double"
STDIN_BYTES = 300 * 1024


@dataclass(frozen=True)
class Setup:
    daemon: Containerd
    image: str
    vfkit: Path


@pytest.fixture(scope="module")
def setup(busybox_image_tar: Path) -> Iterator[Setup]:
    """containerd 2.3 with the erofs snapshotter in block mode, whose shims run every VM
    through the vfkit double (HARPOON_VMM=vfkit, HARPOON_VFKIT: the double installed as
    `vfkit`) with binds as shares (HARPOON_BIND_SHARES=1), busybox imported."""
    if os.geteuid() != 0:
        unavailable("e2e tests need root: containerd runs as root")
    if EROFS_UTILS.missing_binaries():
        unavailable(f"mkfs.erofs with --tar is not built: {EROFS_UTILS.install_hint()}")
    if VHOST_DEVICE_VSOCK.missing_binaries():
        unavailable(
            "vhost-device-vsock (the double's vsock) is not built: run scripts/install-deps"
        )
    for name, found in (("virtiofsd", virtiofsd.find()), ("gvproxy", gvproxy.find())):
        if found is None:
            unavailable(f"{name} is not built: run scripts/install-deps")
    with tempfile.TemporaryDirectory(prefix="hp-vfkit-e2e-") as directory:
        vfkit = vfkit_double.install_wrapper(Path(directory))
        log_dir = os.environ.get("HARPOON_LOG_DIR")
        daemon = Containerd(
            "2.3",
            path_prepend=[scripts_dir()],
            log_dir=Path(log_dir) if log_dir else None,
            log_level="debug",
            snapshotter=EROFS_SNAPSHOTTER,
            extra_env={VMM_ENV: "vfkit", PROGRAM_ENV: str(vfkit), bind_shares.ENV: "1"},
        )
        if daemon.flavour.missing_binaries():
            unavailable(f"containerd 2.3 is not built: {daemon.flavour.install_hint()}")
        daemon.start()
        try:
            yield Setup(daemon, daemon.import_image(busybox_image_tar), vfkit)
        finally:
            daemon.remove_all_containers()
            report = daemon.stop()
            assert report.clean, f"containerd at the module's end: {report}"


def new_id(stem: str) -> str:
    return f"vfkit-{stem}-{secrets.token_hex(4)}"


def watch(setup: Setup, container_id: str) -> VmWatch:
    """A watch of the container's VM: its processes, and any mount where harpoon or
    containerd would mount the container's rootfs or binds on the host -- the erofs
    snapshots, the task bundles (<bundle>/rootfs), harpoon's run directory (the VMs'
    shares) -- of which there must be none.

    Not containerd's mount manager's directory: there ctr itself, not the runtime,
    mounts the new snapshot read-only for ~10 ms to read the image's /etc/group
    (containerd's oci.WithAdditionalGIDs through withReadonlyFS, which on Linux falls back
    to mounting when fsview cannot open the erofs snapshot's mounts; on darwin it does
    not mount)."""
    state_dir = paths.vm_state_dir(setup.daemon.namespace, container_id)
    daemon = setup.daemon
    where = (daemon.root_dir, daemon.state_dir / TASK_BUNDLES, Path(paths.RUN_DIR))
    return VmWatch(state_dir, mounts_under=where)


def run_args(setup: Setup, container_id: str, options: list[str], argv: list[str]) -> list[str]:
    """ctr run's arguments after `run` and its own flags: the runtime, the erofs
    snapshotter (named: ctr's default is overlayfs), options, the image, id and argv."""
    return ["--runtime", HARPOON, "--snapshotter", EROFS_SNAPSHOTTER, *options, setup.image,
            container_id, *argv]  # fmt: skip


def ctr_run(
    setup: Setup, container_id: str, argv: list[str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """`ctr run --rm --net-host` (a Mac has no network namespace to give a VM) of busybox,
    stdin given, its output as bytes."""
    return subprocess.run(
        ctr_command(setup.daemon, "run", "--rm", "--net-host",
                    *run_args(setup, container_id, [], argv)),
        input=stdin, capture_output=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip


def start_detached(
    setup: Setup, container_id: str, argv: list[str], options: list[str] | None = None
) -> None:
    """`ctr run -d` of busybox (options: ctr's, `--net-host` unless they say otherwise),
    then waits until the task runs."""
    options = ["--net-host"] if options is None else options
    setup.daemon.ctr(
        "run", "-d", *run_args(setup, container_id, options, argv), timeout=RUN_TIMEOUT_S
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while task_states(setup.daemon).get(container_id) != "RUNNING":
        assert time.monotonic() < deadline, f"{container_id} never ran"
        time.sleep(0.2)


def without_warnings(stderr: bytes) -> bytes:
    """ctr's stderr without its own warnings (containerd 2.2+ warns of cgroup v1)."""
    return b"".join(
        line for line in stderr.splitlines(keepends=True) if b"level=warning" not in line
    )


def delete_stopped(daemon: Containerd, container_id: str) -> int:
    """Deletes the task once it has stopped, and its container; the task's exit status."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while task_states(daemon).get(container_id) != "STOPPED":
        assert time.monotonic() < deadline, f"{container_id} never stopped"
        time.sleep(0.2)
    deleted = daemon.ctr("task", "delete", container_id)
    daemon.ctr("container", "delete", container_id)
    # ctr warns `... msg="task ID exited with non-zero exit code N"`; says nothing of 0.
    found = re.search(r"exit code (\d+)", deleted.stdout + deleted.stderr)
    return int(found.group(1)) if found else 0


def exec_in(daemon: Containerd, container_id: str, script: str) -> subprocess.CompletedProcess[str]:
    """`ctr task exec` of `sh -c script`; its stderr without ctr's warnings."""
    done = daemon.ctr(
        "task", "exec", "--exec-id", f"x{secrets.token_hex(3)}", container_id, "sh", "-c", script,
        check=False, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    done.stderr = without_warnings(done.stderr.encode()).decode()
    return done


def double_private_dirs(vm: VmWatch) -> set[Path]:
    """The double's own directories (TMPDIR/vfkit-double-<its pid>-XXXX: its helpers'
    sockets), as its processes named them."""
    found = set()
    for process in vm.seen.values():
        for arg in process.argv:
            for word in re.split(r"[ ,=]", arg):
                path = Path(word)
                for depth, part in enumerate(path.parts):
                    if path.is_absolute() and part.startswith(launch.PRIVATE_PREFIX):
                        found.add(Path(*path.parts[: depth + 1]))
    return found


def assert_nothing_left(daemon: Containerd, container_id: str, vm: VmWatch) -> None:
    """Nothing was mounted on the host while the container ran; once deleted, no task,
    container, shim, VM process (the double, its QEMU, vhost-device-vsock, virtiofsd and
    janitor; gvproxy), socket, state, mount or loop device of it is left (given a while
    to go)."""
    assert vm.seen, "no process of the VM was ever seen"
    assert vm.mounts == set(), "mounted on the host while the container ran"
    private = double_private_dirs(vm)
    assert private, "the double named no directory of its own"

    def leaks() -> list[str]:
        return vm_leaks(daemon, container_id, vm) + [
            f"the double's directory {d}" for d in private if d.exists()
        ]

    deadline = time.monotonic() + GONE_TIMEOUT_S
    while leaks() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leaks() == []


def guest_kernel_release() -> str:
    from harpoon.guest import find_guest
    from harpoon.vmm.backend import host_arch

    return find_guest(host_arch()).kernel_release


# -- run ---------------------------------------------------------------------------------


def test_ctr_run_prints_the_guests_kernel_through_the_double(setup: Setup) -> None:
    container_id = new_id("run")
    vm = watch(setup, container_id)
    try:
        with vm.watching():
            result = ctr_run(setup, container_id, ["uname", "-r"])
    finally:
        remove(setup.daemon, container_id)
    assert (result.returncode, without_warnings(result.stderr)) == (0, b""), result.stderr
    assert result.stdout.decode().strip() == guest_kernel_release()
    assert result.stdout.decode().strip() != os.uname().release
    assert vm.vmm is not None and DOUBLE_MODULE in vm.vmm.argv
    assert_nothing_left(setup.daemon, container_id, vm)


# -- one long-running container: the VMM, exec, binds, erofs; SIGKILL at the end ---------


@dataclass(frozen=True)
class Shared:
    container_id: str
    vm: VmWatch
    read_only: Path
    read_write: Path


@pytest.fixture(scope="module")
def shared(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """A container that sleeps, with /data a read-only bind and /out a read-write one,
    its VM watched while it runs. Removed at the end if a test left it."""
    base = tmp_path_factory.mktemp("binds")
    read_only, read_write = base / "ro", base / "rw"
    read_only.mkdir()
    read_write.mkdir()
    (read_only / "in.txt").write_text("from the host\n")
    container_id = new_id("shared")
    vm = watch(setup, container_id)
    binds = [
        "--net-host",
        "--mount", f"type=bind,src={read_only},dst=/data,options=rbind:ro",
        "--mount", f"type=bind,src={read_write},dst=/out,options=rbind:rw",
    ]  # fmt: skip
    try:
        with vm.watching():
            start_detached(setup, container_id, ["sleep", "100000"], binds)
            yield Shared(container_id, vm, read_only, read_write)
    finally:
        remove(setup.daemon, container_id)


def running(setup: Setup, shared: Shared) -> str:
    state = task_states(setup.daemon).get(shared.container_id)
    assert state == "RUNNING", f"the shared container is {state} (SIGKILLed by the last test?)"
    return shared.container_id


def test_the_vm_is_the_doubles_and_answers_vfkits_rest_api(setup: Setup, shared: Shared) -> None:
    container_id = running(setup, shared)
    rest = shared.vm.state_dir / REST_SOCKET_NAME
    assert rest.is_socket()
    assert asyncio.run(VfkitApi(rest).state()).state == "Running"
    vmm = shared.vm.vmm
    assert vmm is not None
    # The shim ran the program HARPOON_VFKIT names, which execs the double.
    assert vmm.argv[:3] == (sys.executable, "-m", DOUBLE_MODULE), vmm.argv
    assert vmm.argv[3] == "--cpus" and f"unix://{rest}" in vmm.argv
    [shim] = [s for s in setup.daemon.shims() if s.flag("id") == container_id]
    parent = Path(f"/proc/{vmm.pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    assert int(parent) == shim.pid
    # The double's QEMU, the guest's vsock through vhost-device-vsock, and each virtio-fs
    # share through a virtiofsd of its own: the rootfs share and the binds' directories
    # (the two binds', and /etc, whose hosts and resolv.conf ctr binds for --net-host).
    helpers = [p for p in shared.vm.alive() if p.pid != vmm.pid]
    names = sorted(Path(p.argv[0]).name for p in helpers)
    assert len([n for n in names if n.startswith("qemu-system-")]) == 1, names
    assert names.count("vhost-device-vsock") == 1, names
    shares = {
        option.split("sharedDir=", 1)[1].split(",")[0]
        for option in vmm.argv
        if option.startswith("virtio-fs,")
    }
    assert {str(shared.read_only), str(shared.read_write)} < shares
    served = {
        arg.removeprefix("--shared-dir=")
        for p in helpers
        if Path(p.argv[0]).name == "virtiofsd"
        for arg in p.argv
        if arg.startswith("--shared-dir=")
    }
    assert served == shares
    # The NIC's gvproxy speaks vfkit's datagrams.
    gvproxies = [p for p in helpers if Path(p.argv[0]).name.startswith("gvproxy")]
    assert len(gvproxies) == 1 and "-listen-vfkit" in gvproxies[0].argv


def test_exec_runs_in_the_container_with_its_output_and_status(
    setup: Setup, shared: Shared
) -> None:
    container_id = running(setup, shared)
    result = exec_in(setup.daemon, container_id, "echo out $$; echo err >&2; exit 5")
    assert (result.returncode, result.stderr) == (5, "err\n")
    assert result.stdout.startswith("out ") and result.stdout.split()[1] != "1"
    init = exec_in(setup.daemon, container_id, "cat /proc/1/cmdline")
    assert (init.returncode, init.stdout) == (0, "sleep\x00100000\x00")


def test_a_read_only_bind_is_refused_in_the_guest_and_a_read_write_one_written_through(
    setup: Setup, shared: Shared
) -> None:
    container_id = running(setup, shared)
    result = exec_in(
        setup.daemon, container_id,
        "cat /data/in.txt; echo x > /data/in.txt; echo written > /out/w.txt; "
        "grep -E ' /(data|out) ' /proc/mounts",
    )  # fmt: skip
    said = result.stdout.splitlines()
    assert said[0] == "from the host", result.stdout
    assert "Read-only file system" in result.stderr, result.stderr
    assert (shared.read_only / "in.txt").read_text() == "from the host\n"
    assert sorted(os.listdir(shared.read_only)) == ["in.txt"]
    assert (shared.read_write / "w.txt").read_text() == "written\n"
    # Each bind is a virtiofs share the guest mounted, read-only there for /data (vfkit's
    # shares are writable on the host's side), and the host mounted nothing for them.
    mounts = {fields[1]: fields for fields in map(str.split, said[1:])}
    assert mounts["/data"][2] == "virtiofs" and "ro" in mounts["/data"][3].split(","), said
    assert mounts["/out"][2] == "virtiofs" and "rw" in mounts["/out"][3].split(","), said
    with open("/proc/self/mountinfo") as mountinfo:
        naming = [line for line in mountinfo if str(shared.read_only.parent) in line]
    assert naming == []


def device_options(option: str) -> dict[str, str]:
    """A vfkit `--device` value's key=value options (`virtio-blk,path=P,deviceId=D`)."""
    return dict(field.split("=", 1) for field in option.split(",")[1:] if "=" in field)


def test_the_rootfs_is_erofs_disks_assembled_in_the_guest(setup: Setup, shared: Shared) -> None:
    container_id = running(setup, shared)
    # The guest's overlay is the container's root; its lower layer an erofs filesystem on
    # a virtio disk, found by its serial (the deviceId harpoon gave vfkit).
    script = (
        "grep ' / ' /proc/mounts; "
        "for d in /sys/fs/erofs/vd*; do echo erofs $(cat /sys/block/${d##*/}/serial); done"
    )
    said = exec_in(setup.daemon, container_id, script).stdout.splitlines()
    assert said[0].split()[:3] == ["overlay", "/", "overlay"], said
    vmm = shared.vm.vmm
    assert vmm is not None
    blocks = [device_options(o) for o in vmm.argv if o.startswith("virtio-blk,")]
    disks = {block["deviceId"]: Path(block["path"]) for block in blocks}
    snapshots = setup.daemon.root_dir / "io.containerd.snapshotter.v1.erofs" / "snapshots"
    assert sorted(d.name for d in disks.values()) == ["layer.erofs", "rwlayer.img"], disks
    assert all(d.is_relative_to(snapshots) for d in disks.values()), disks
    [erofs] = said[1:]
    assert disks[erofs.split()[1]].name == "layer.erofs", said
    log = setup.daemon.log_path.read_text(errors="replace")
    assert f"assembled the rootfs of {container_id} from 2 disks" in log
    # Nothing of it on the host: no mount (the watch saw none), no loop device.
    assert shared.vm.mounts == set() and setup.daemon.mounts() == []
    base = str(setup.daemon.paths.base)
    assert [f for f in loop_backing_files() if f.startswith(base)] == []


# -- stdio and signals ------------------------------------------------------------------


def test_stdin_is_piped_through_and_stdout_and_stderr_stay_apart(setup: Setup) -> None:
    """300 KiB through stdin and back on stdout, a line on stderr, the exit status. The
    process reads a known length: ctr sends no CloseIO when its stdin ends before its
    Create has returned (a cold boot's seconds), under runc too (test_differential.py)."""
    container_id = new_id("stdio")
    data = os.urandom(STDIN_BYTES)
    vm = watch(setup, container_id)
    script = f"head -c {len(data)}; echo to-stderr >&2; exit 3"
    try:
        with vm.watching():
            result = ctr_run(setup, container_id, ["sh", "-c", script], stdin=data)
    finally:
        remove(setup.daemon, container_id)
    assert result.returncode == 3, result.stderr
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    assert without_warnings(result.stderr) == b"to-stderr\n"
    assert_nothing_left(setup.daemon, container_id, vm)


def test_sigterm_runs_the_containers_trap(setup: Setup) -> None:
    container_id = new_id("term")
    vm = watch(setup, container_id)
    # PID 1 ignores a signal it has no handler for: TERM only once the trap is set.
    trapped = "trap 'exit 42' TERM; touch /trapped; sleep 100000 & wait"
    try:
        with vm.watching():
            start_detached(setup, container_id, ["sh", "-c", trapped])
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while exec_in(setup.daemon, container_id, "test -e /trapped").returncode != 0:
                assert time.monotonic() < deadline, "the trap was never set"
                time.sleep(0.5)
            setup.daemon.ctr("task", "kill", "--signal", "SIGTERM", container_id)
            assert delete_stopped(setup.daemon, container_id) == 42
    finally:
        remove(setup.daemon, container_id)
    assert_nothing_left(setup.daemon, container_id, vm)


# -- a published port -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(url: str, timeout_s: float) -> bytes:
    """url's body, asked again until it answers (the VM boots meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return bytes(answer.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_port_published_through_gvproxy_serves_the_host_until_the_container_goes(
    setup: Setup,
) -> None:
    container_id = new_id("port")
    port = free_port()
    vm = watch(setup, container_id)
    serve = "mkdir /www && seq 1 30000 > /www/seq.txt && exec httpd -f -p 80 -h /www"
    # Not --net-host: a network namespace of its own, its port 80 published by gvproxy.
    published = ["--annotation", f"{PORTS_ANNOTATION}=127.0.0.1:{port}:80"]
    try:
        with vm.watching():
            start_detached(setup, container_id, ["sh", "-c", serve], published)
            served = fetch(f"http://127.0.0.1:{port}/seq.txt", RUN_TIMEOUT_S)
            assert served == "".join(f"{n}\n" for n in range(1, 30001)).encode()
            setup.daemon.ctr("task", "kill", "--signal", "SIGKILL", container_id)
            assert delete_stopped(setup.daemon, container_id) == 137
    finally:
        remove(setup.daemon, container_id)
    assert_nothing_left(setup.daemon, container_id, vm)
    assert not listening(port)


# -- a killed shim ----------------------------------------------------------------------


def test_a_killed_shim_takes_the_double_and_shim_delete_cleans_up(setup: Setup) -> None:
    container_id = new_id("shimkill")
    vm = watch(setup, container_id)
    try:
        with vm.watching():
            start_detached(setup, container_id, ["sleep", "100000"])
            vm.look()
            vmm = vm.vmm
            assert vmm is not None and DOUBLE_MODULE in vmm.argv
            [shim] = [s for s in setup.daemon.shims() if s.flag("id") == container_id]
            os.kill(shim.pid, 9)
            # The double dies with its parent (a parent-death signal), or by `shim delete`
            # from the VM's pid files (harpoon.vmm.leftovers: a Mac's way), which containerd
            # runs once it sees its shim gone, then dropping the task.
            deadline = time.monotonic() + GONE_TIMEOUT_S
            while container_id in setup.daemon.tasks() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert container_id not in setup.daemon.tasks()
            while vmm.pid in [p.pid for p in vm.alive()] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert vmm.pid not in [p.pid for p in vm.alive()], "the double outlived its shim"
            setup.daemon.ctr("container", "delete", container_id)
    finally:
        remove(setup.daemon, container_id)
    assert_nothing_left(setup.daemon, container_id, vm)


# -- scripts/macos-smoke.sh --------------------------------------------------------------


def vm_state_dirs() -> set[Path]:
    vms = Path(paths.vm_state_dir_str("", "")).parent
    return set(vms.iterdir()) if vms.is_dir() else set()


def test_the_macos_smoke_script_passes_through_the_double(
    setup: Setup, busybox_image_tar: Path, tmp_path: Path
) -> None:
    """The script a Mac runs, here against this module's containerd and the double, in a
    namespace of its own. SKIP_GUEST_BUILD=1: the guest image is install-deps' (a build
    here would write the machine's guest directory, minutes when it is not current)."""
    namespace = "vfkit-smoke"
    before = vm_state_dirs()
    harpoon = scripts_dir() / "harpoon"
    env = dict(os.environ) | {
        "CONTAINERD_ADDRESS": setup.daemon.address,
        "CTR": str(setup.daemon.flavour.ctr),
        "NAMESPACE": namespace,
        "IMAGE": setup.image,
        "IMAGE_TAR": str(busybox_image_tar),
        "PORT": str(free_port()),
        "HARPOON": str(harpoon) if harpoon.exists() else "harpoon",
        "PYTHON": sys.executable,
        "SKIP_GUEST_BUILD": "1",
        VMM_ENV: "vfkit",
        PROGRAM_ENV: str(setup.vfkit),
        bind_shares.ENV: "1",
    }
    script = Path(__file__).resolve().parents[2] / "scripts" / "macos-smoke.sh"
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True,
        timeout=SMOKE_TIMEOUT_S, check=False,
    )  # fmt: skip
    table = result.stdout[result.stdout.find("harpoon smoke:") :]
    saved = tmp_path / "macos-smoke.md"
    saved.write_text(table)
    print(f"\n{table}\n(the table: {saved})")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    results = {cells[0]: cells[1] for cells in (row.strip("| ").split(" | ") for row in rows[1:])}
    assert results == {
        "guest build": "skip",
        "doctor": "pass",
        "containerd": "pass",
        "image": "pass",
        "uname -m": "pass",
        "bind ro": "pass",
        "port": "pass",
    }, result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    assert "; VMM vfkit;" in table
    # It removed its containers; their shims, VMs and state went.
    assert setup.daemon.ctr("container", "ls", "-q", namespace=namespace).stdout == ""
    assert setup.daemon.ctr("task", "ls", "-q", namespace=namespace).stdout == ""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while [s for s in setup.daemon.shims() if s.flag("namespace") == namespace]:
        assert time.monotonic() < deadline, "the smoke's shims outlived its containers"
        time.sleep(0.2)
    assert vm_state_dirs() == before, "the smoke's VMs left their state directories"
    assert setup.daemon.mounts() == []


# -- last: SIGKILL of the shared container ------------------------------------------------


def test_sigkill_ends_a_container_with_137_and_leaves_nothing(setup: Setup, shared: Shared) -> None:
    container_id = running(setup, shared)
    setup.daemon.ctr("task", "kill", "--signal", "SIGKILL", container_id)
    assert delete_stopped(setup.daemon, container_id) == 137
    assert_nothing_left(setup.daemon, container_id, shared.vm)
