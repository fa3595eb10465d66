"""The container's rootfs share as a real guest mounts it (harpoon.sandbox.rootfs): a
sandbox started as the shim starts one, with a host directory bound as the rootfs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.guest.cache import GuestImage
from harpoon.sandbox.rootfs import GUEST_ROOTFS

if TYPE_CHECKING:
    from tests.vm.conftest import StartedSandbox, StartSandbox

pytestmark = pytest.mark.vm

GUEST_ROOT = GUEST_ROOTFS

# Maps the file MAP_SHARED and writable, writes through the mapping, msyncs.
WRITE_THROUGH_A_SHARED_MAPPING = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
fd = os.open(sys.argv[1], os.O_RDWR)
address = libc.mmap(None, 4096, 3, 1, fd, 0)  # PROT_READ | PROT_WRITE, MAP_SHARED
if address in (None, ctypes.c_void_p(-1).value):
    sys.exit(f"mmap failed: errno {ctypes.get_errno()}")
ctypes.memmove(address, b"written through the mapping", 27)
if libc.msync(address, 4096, 4) != 0:  # MS_SYNC
    sys.exit(f"msync failed: errno {ctypes.get_errno()}")
"""


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hp-rootfs-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def started(guest: GuestImage, sandboxes: StartSandbox, rootfs: Path) -> Iterator[StartedSandbox]:
    """A sandbox started as the shim starts one, rootfs attached at GUEST_ROOT."""
    with sandboxes(guest, "rootfs-share") as started:
        assert started.sandbox.share_rootfs(rootfs) == GUEST_ROOT
        yield started


def run(started: StartedSandbox, *args: str) -> tuple[int, bytes]:
    status, out, err = started.run(*args)
    return status, out + err


def test_a_rootfs_file_can_be_mapped_shared_and_written_through(
    started: StartedSandbox, rootfs: Path
) -> None:
    """As under runc (sqlite's WAL index, LMDB): 9p without a cache mode refuses
    MAP_SHARED writable mappings with EINVAL."""
    (rootfs / "mapped").write_bytes(bytes(4096))
    program = ("/usr/bin/python3", "-c", WRITE_THROUGH_A_SHARED_MAPPING, f"{GUEST_ROOT}/mapped")
    assert run(started, *program) == (0, b"")
    assert (rootfs / "mapped").read_bytes().startswith(b"written through the mapping")


def test_a_host_change_to_a_rootfs_file_is_seen_by_the_guest(
    started: StartedSandbox, rootfs: Path
) -> None:
    """Only mmap is cached: what the host writes after the guest read a file is what
    the guest reads next (as with runc, where both see one file)."""
    (rootfs / "changing").write_text("first\n")
    assert run(started, "/bin/cat", f"{GUEST_ROOT}/changing") == (0, b"first\n")
    (rootfs / "changing").write_text("second, longer\n")
    assert run(started, "/bin/cat", f"{GUEST_ROOT}/changing") == (0, b"second, longer\n")
