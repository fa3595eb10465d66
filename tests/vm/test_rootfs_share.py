"""The container's rootfs share as a real guest mounts it (harpoon.sandbox.rootfs): a
sandbox started as the shim starts one, with a host directory bound as the rootfs."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.guest.cache import GuestImage
from harpoon.sandbox.rootfs import GUEST_ROOTFS
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.prestart import rootfs_share, vm_config
from harpoon.shim.resources import vm_size
from harpoon.vmm.qemu import QemuVM

if TYPE_CHECKING:
    from tests.vm.conftest import RunInGuest

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


class Started:
    def __init__(self, sandbox: Sandbox, loop: asyncio.AbstractEventLoop, run: RunInGuest) -> None:
        self.sandbox, self.loop, self._run = sandbox, loop, run

    def run(self, *args: str) -> tuple[int, bytes]:
        running = self._run(self.sandbox.agent, "run", *args)
        status, out, err = self.loop.run_until_complete(asyncio.wait_for(running, 120))
        return status, out + err


@pytest.fixture(scope="module")
def started(guest: GuestImage, guest_process: RunInGuest, rootfs: Path) -> Iterator[Started]:
    """A sandbox started as the shim starts one, rootfs attached at GUEST_ROOT."""
    loop = asyncio.new_event_loop()
    name = f"rootfs-share-{os.getpid()}-{time.time_ns()}"
    config = vm_config("hp-test", name, guest, vm_size({}))
    sandbox = Sandbox(config, QemuVM, rootfs_share=rootfs_share(config))
    try:
        loop.run_until_complete(sandbox.start())
        assert sandbox.share_rootfs(rootfs) == GUEST_ROOT
        yield Started(sandbox, loop, guest_process)
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)


def test_a_rootfs_file_can_be_mapped_shared_and_written_through(
    started: Started, rootfs: Path
) -> None:
    """As under runc (sqlite's WAL index, LMDB): 9p without a cache mode refuses
    MAP_SHARED writable mappings with EINVAL."""
    (rootfs / "mapped").write_bytes(bytes(4096))
    program = ("/usr/bin/python3", "-c", WRITE_THROUGH_A_SHARED_MAPPING, f"{GUEST_ROOT}/mapped")
    assert started.run(*program) == (0, b"")
    assert (rootfs / "mapped").read_bytes().startswith(b"written through the mapping")


def test_a_host_change_to_a_rootfs_file_is_seen_by_the_guest(
    started: Started, rootfs: Path
) -> None:
    """Only mmap is cached: what the host writes after the guest read a file is what
    the guest reads next (as with runc, where both see one file)."""
    (rootfs / "changing").write_text("first\n")
    assert started.run("/bin/cat", f"{GUEST_ROOT}/changing") == (0, b"first\n")
    (rootfs / "changing").write_text("second, longer\n")
    assert started.run("/bin/cat", f"{GUEST_ROOT}/changing") == (0, b"second, longer\n")
