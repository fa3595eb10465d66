"""The rootfs share's host side (harpoon.sandbox.rootfs) with real bind mounts: the
container's files show through the export, and releasing it never touches them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harpoon.sandbox import rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


@pytest.fixture
def container_rootfs(tmp_path: Path) -> Path:
    directory = tmp_path / "bundle" / "rootfs"
    (directory / "etc").mkdir(parents=True)
    (directory / "etc" / "hostname").write_text("mine\n")
    return directory


def mounted(path: Path) -> bool:
    return rootfs._mounted_under(path)


def test_the_rootfs_shows_through_the_export_and_survives_its_release(
    tmp_path: Path, container_rootfs: Path
) -> None:
    share = tmp_path / "share" / "c1"
    rootfs.prepare(share)
    assert sorted(p.name for p in share.iterdir()) == ["rootfs"]
    rootfs.attach(share, container_rootfs)
    try:
        assert (share / "rootfs" / "etc" / "hostname").read_text() == "mine\n"
        (share / "rootfs" / "written-by-the-guest").write_text("x")
    finally:
        rootfs.release(share)
    assert not share.exists() and not mounted(share)
    assert (container_rootfs / "etc" / "hostname").read_text() == "mine\n"
    assert (container_rootfs / "written-by-the-guest").exists()
    rootfs.release(share)  # idempotent


def test_what_the_guest_left_in_its_export_goes_with_it(
    tmp_path: Path, container_rootfs: Path
) -> None:
    share = tmp_path / "share" / "c1"
    rootfs.prepare(share)
    rootfs.attach(share, container_rootfs)
    (share / "junk").mkdir()
    (share / "junk" / "file").write_text("x")
    rootfs.release(share)
    assert not share.exists()
    assert (container_rootfs / "etc" / "hostname").read_text() == "mine\n"


def test_a_stale_export_of_a_killed_shim_is_cleared_first(
    tmp_path: Path, container_rootfs: Path
) -> None:
    share = tmp_path / "share" / "c1"
    rootfs.prepare(share)
    rootfs.attach(share, container_rootfs)  # then the shim was killed
    rootfs.prepare(share)  # the next container of that name
    try:
        assert not mounted(share / "rootfs")
        assert list((share / "rootfs").iterdir()) == []
    finally:
        rootfs.release(share)
    assert (container_rootfs / "etc" / "hostname").read_text() == "mine\n"


def test_an_export_already_prepared_is_kept_as_the_vm_may_be_exporting_it(
    tmp_path: Path,
) -> None:
    share = tmp_path / "share" / "c1"
    rootfs.prepare(share)
    exported = os.open(share, os.O_RDONLY | os.O_DIRECTORY)  # as QEMU holds its export
    try:
        rootfs.prepare(share)  # the sandbox starting the VM launched ahead
        assert os.fstat(exported).st_nlink > 0
        assert os.fstat(exported).st_ino == os.stat(share).st_ino
        (share / "left-by-the-guest").write_text("x")
        rootfs.prepare(share)  # not as prepared: made anew
        assert os.listdir(share) == ["rootfs"]
        assert os.fstat(exported).st_nlink == 0
    finally:
        os.close(exported)
        rootfs.release(share)


def test_a_link_put_in_place_of_the_mount_point_is_refused(
    tmp_path: Path, container_rootfs: Path
) -> None:
    share = tmp_path / "share" / "c1"
    rootfs.prepare(share)
    (share / "rootfs").rmdir()
    (share / "rootfs").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(OSError):
        rootfs.attach(share, container_rootfs)
    assert not mounted(tmp_path / "elsewhere")
    rootfs.release(share)
    assert not share.exists() and (tmp_path / "elsewhere").is_dir()
