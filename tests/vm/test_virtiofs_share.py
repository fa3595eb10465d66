"""A rootfs share served by virtiofs (HARPOON_SHARE_FS=virtiofs: a cold boot, a
virtiofsd of its own; harpoon.vmm.virtiofsd) as a real guest mounts it: reads, writes,
a host change seen at the next read, and nothing left once the VM is stopped."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.guest.cache import GuestImage
from harpoon.sandbox import plan
from harpoon.sandbox.rootfs import GUEST_ROOTFS
from harpoon.vmm import virtiofsd

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


@pytest.fixture(scope="module")
def started(
    guest: GuestImage, sandboxes: StartSandbox, rootfs: Path
) -> Iterator[tuple[StartedSandbox, list[Path]]]:
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
