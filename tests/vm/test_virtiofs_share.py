"""A rootfs share served by virtiofs (HARPOON_SHARE_FS=virtiofs: a cold boot, a
virtiofsd of its own; harpoon.vmm.virtiofsd) as a real amd64 and arm64 guest mounts it:
reads, writes, a host change seen at the next read, and nothing left once the VM is
stopped."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.sandbox import plan
from harpoon.sandbox.rootfs import GUEST_ROOTFS
from harpoon.vmm import virtiofsd
from tests.vm.guests import GUEST_ARCHES, guest_for

if TYPE_CHECKING:
    from tests.vm.conftest import StartedSandbox, StartSandbox

pytestmark = pytest.mark.vm

GUEST_ROOT = GUEST_ROOTFS


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hp-vfs-rootfs-") as directory:
        yield Path(directory)


def pids_of_virtiofsd_serving(directory: Path) -> list[int]:
    wanted = f"--shared-dir={directory}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == b"virtiofsd" and wanted in argv:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module", params=GUEST_ARCHES)
def started(
    request: pytest.FixtureRequest, sandboxes: StartSandbox, rootfs: Path
) -> Iterator[tuple[StartedSandbox, list[Path]]]:
    guest = guest_for(request.param)
    for entry in rootfs.iterdir():  # what the other architecture's VM wrote
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if virtiofsd.find() is None:
        if os.environ.get("CI"):
            raise RuntimeError("no virtiofsd: scripts/install-deps builds it")
        pytest.skip("no virtiofsd (scripts/install-deps builds it)")
    left: list[Path] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(plan.SHARE_FS_ENV, "virtiofs")
        with sandboxes(guest, "virtiofs-share") as started:
            config = started.sandbox.config
            left += [virtiofsd.socket_path(config.state_dir, s) for s in config.shares]
            left += [virtiofsd.pid_file(config.state_dir, s) for s in config.shares]
            left.append(started.sandbox.rootfs_share or Path("/nonexistent"))
            assert started.sandbox.share_rootfs(rootfs) == GUEST_ROOT
            yield started, left


def run(started: StartedSandbox, *args: str) -> tuple[int, bytes]:
    status, out, err = started.run(*args)
    return status, out + err


def test_the_vm_booted_cold_with_a_virtiofs_share_and_its_virtiofsd(
    started: tuple[StartedSandbox, list[Path]],
) -> None:
    sandbox = started[0].sandbox
    assert [share.fs for share in sandbox.config.shares] == ["virtiofs"]
    assert not sandbox.restored
    assert sandbox.rootfs_share is not None
    assert len(pids_of_virtiofsd_serving(sandbox.rootfs_share)) == 1
    status, mounts = run(started[0], "/bin/cat", "/proc/mounts")
    assert status == 0
    assert b"rootfs /run/harpoon/share virtiofs" in mounts


def test_the_guest_reads_and_writes_through_the_share(
    started: tuple[StartedSandbox, list[Path]], rootfs: Path
) -> None:
    (rootfs / "from-host").write_text("hello from the host\n")
    assert run(started[0], "/bin/cat", f"{GUEST_ROOT}/from-host") == (0, b"hello from the host\n")
    command = f"echo written by the guest > {GUEST_ROOT}/from-guest && mkdir {GUEST_ROOT}/d"
    assert run(started[0], "/bin/sh", "-c", command) == (0, b"")
    assert (rootfs / "from-guest").read_text() == "written by the guest\n"
    assert (rootfs / "d").is_dir()


def test_a_host_change_is_seen_at_the_next_read(
    started: tuple[StartedSandbox, list[Path]], rootfs: Path
) -> None:
    """nerdctl rewrites /etc/hosts in place while the container runs (cache=never)."""
    (rootfs / "changing").write_text("first\n")
    assert run(started[0], "/bin/cat", f"{GUEST_ROOT}/changing") == (0, b"first\n")
    (rootfs / "changing").write_text("second, longer\n")
    assert run(started[0], "/bin/cat", f"{GUEST_ROOT}/changing") == (0, b"second, longer\n")
    (rootfs / "changing").write_text("3\n")
    assert run(started[0], "/bin/cat", f"{GUEST_ROOT}/changing") == (0, b"3\n")


def test_zz_nothing_is_left_once_the_vm_is_stopped(
    started: tuple[StartedSandbox, list[Path]], rootfs: Path
) -> None:
    """Last (by name): stops the module's sandbox itself."""
    started_sandbox, left = started
    sandbox = started_sandbox.sandbox
    share = sandbox.rootfs_share
    assert share is not None
    started_sandbox.loop.run_until_complete(sandbox.stop())
    assert pids_of_virtiofsd_serving(share) == []
    assert [path for path in left if path.exists()] == []


LAUNCH_AND_WAIT = r"""
import sys, time
from pathlib import Path
from harpoon.guest import find_guest
from harpoon.vmm.backend import host_arch
from harpoon.vmm.base import VMConfig
from harpoon.vmm.devices import Share
from harpoon.vmm.qemu_launch import launch
guest = find_guest(host_arch())
config = VMConfig(
    name="vfs-killed", arch=host_arch(), kernel=guest.kernel, initrd=guest.initrd,
    state_dir=Path(sys.argv[1]), shares=(Share("rootfs", Path(sys.argv[2]), fs="virtiofs"),),
)
launched = launch(config)
print(launched.process.pid, *(helper.pid for helper in launched.helpers), flush=True)
time.sleep(600)
"""


def test_a_killed_shims_virtiofsd_dies_and_delete_finds_nothing_left(tmp_path: Path) -> None:
    """A shim killed with SIGKILL takes its QEMU and virtiofsd along (parent-death
    signal); `delete` (harpoon.vmm.leftovers.kill_vmm) then kills whatever is left."""
    import signal
    import subprocess
    import sys
    import time

    from harpoon.vmm import leftovers

    if virtiofsd.find() is None:
        pytest.skip("no virtiofsd")
    state_dir, export = tmp_path / "vm", tmp_path / "export"
    export.mkdir()
    shim = subprocess.Popen(
        [sys.executable, "-c", LAUNCH_AND_WAIT, str(state_dir), str(export)],
        stdout=subprocess.PIPE,
    )
    try:
        assert shim.stdout is not None
        pids = [int(pid) for pid in shim.stdout.readline().split()]
        assert len(pids) == 2, pids  # QEMU, virtiofsd
        assert pids_of_virtiofsd_serving(export) == [pids[1]]
    finally:
        shim.send_signal(signal.SIGKILL)
        shim.wait()
    leftovers.kill_vmm(str(state_dir))
    deadline = time.monotonic() + 10
    while pids_of_virtiofsd_serving(export) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids_of_virtiofsd_serving(export) == []
    assert (
        not Path(f"/proc/{pids[0]}").exists()
        or b"qemu" not in Path(f"/proc/{pids[0]}/cmdline").read_bytes()
    )
