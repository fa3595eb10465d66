"""The initramfs writer: newc archives that the kernel (and cpio) read, byte-for-byte stable."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from harpoon.guest import initramfs


def sample_entries() -> list[initramfs.Entry]:
    return [
        initramfs.file("init", b"#!/bin/sh\necho hi\n", 0o755),
        initramfs.file("usr/lib/python3.11/os.pyc", b"\x01" * 5),
        initramfs.symlink("bin/sh", "busybox"),
        initramfs.file("bin/busybox", b"\x7fELF" + b"\0" * 123, 0o755),
        initramfs.char_device("dev/console", 5, 1),
        initramfs.directory("tmp", 0o1777),
    ]


def test_an_archive_reads_back_with_every_entry_and_its_parents() -> None:
    members = initramfs.read(initramfs.write(sample_entries()))

    assert sorted(members) == [
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "init",
        "tmp",
        "usr",
        "usr/lib",
        "usr/lib/python3.11",
        "usr/lib/python3.11/os.pyc",
    ]
    assert members["init"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(members["init"].mode) == 0o755
    assert stat.S_ISLNK(members["bin/sh"].mode) and members["bin/sh"].data == b"busybox"
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert members["usr/lib"].is_dir


def test_the_same_entries_in_any_order_give_the_same_bytes() -> None:
    entries = sample_entries()

    assert initramfs.write(entries) == initramfs.write(list(reversed(entries)))


def test_a_later_entry_for_the_same_path_replaces_the_earlier_one() -> None:
    archive = initramfs.write([initramfs.file("init", b"old"), initramfs.file("init", b"new")])

    assert initramfs.read(archive)["init"].data == b"new"


def test_absolute_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="relative"):
        initramfs.write([initramfs.file("/init", b"")])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_gnu_cpio_lists_the_archive_with_root_owner_and_fixed_mtime() -> None:
    archive = initramfs.write(sample_entries())

    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()

    lines = listing.splitlines()
    assert len(lines) == 11
    assert all(" root " in line for line in lines)
    assert all("1970" in line for line in lines)
    assert any(line.endswith("bin/sh -> busybox") for line in lines)
