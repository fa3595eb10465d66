"""The container's rootfs share as a real guest mounts it (harpoon.sandbox.rootfs): a
sandbox started as the shim starts one, with a host directory bound as the rootfs."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.prestart import rootfs_share, vm_config
from harpoon.shim.resources import vm_size
from harpoon.vmm.qemu import QemuVM, host_arch

pytestmark = pytest.mark.vm

GUEST_ROOT = "/run/harpoon/rootfs"

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
def sandbox(rootfs: Path) -> Iterator[tuple[Sandbox, asyncio.AbstractEventLoop]]:
    from harpoon.guest import find_guest

    try:
        guest = find_guest(host_arch())
    except Exception as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no guest image: {error}")
    loop = asyncio.new_event_loop()
    config = vm_config(
        "hp-test", f"rootfs-share-{os.getpid()}-{time.time_ns()}", guest, vm_size({})
    )
    sandbox = Sandbox(config, QemuVM, rootfs_share=rootfs_share(config))
    try:
        loop.run_until_complete(sandbox.start())
        loop.run_until_complete(sandbox.share_rootfs(rootfs, GUEST_ROOT))
        yield sandbox, loop
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        import shutil

        shutil.rmtree(config.state_dir, ignore_errors=True)


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def _run(sandbox: Sandbox, process_id: str, *args: str) -> tuple[int, bytes]:
    agent = sandbox.agent
    assert agent is not None
    await agent.create_process(
        agent_pb2.CreateProcessRequest(id=process_id, args=list(args), stdout=True, stderr=True)
    )
    out = asyncio.ensure_future(_collect(agent.read_output(process_id, agent_pb2.STDOUT)))
    err = asyncio.ensure_future(_collect(agent.read_output(process_id, agent_pb2.STDERR)))
    await agent.start_process(process_id)
    status = await agent.wait_process(process_id)
    await agent.delete_process(process_id)
    return status.exit_status, await out + await err


def test_a_rootfs_file_can_be_mapped_shared_and_written_through(
    sandbox: tuple[Sandbox, asyncio.AbstractEventLoop], rootfs: Path
) -> None:
    """As under runc (sqlite's WAL index, LMDB): 9p without a cache mode refuses
    MAP_SHARED writable mappings with EINVAL."""
    (rootfs / "mapped").write_bytes(bytes(4096))
    vm, loop = sandbox
    status, output = loop.run_until_complete(
        asyncio.wait_for(
            _run(
                vm,
                "mmap",
                "/usr/bin/python3",
                "-c",
                WRITE_THROUGH_A_SHARED_MAPPING,
                f"{GUEST_ROOT}/mapped",
            ),
            120,
        )
    )
    assert (status, output) == (0, b"")
    assert (rootfs / "mapped").read_bytes().startswith(b"written through the mapping")


def test_a_host_change_to_a_rootfs_file_is_seen_by_the_guest(
    sandbox: tuple[Sandbox, asyncio.AbstractEventLoop], rootfs: Path
) -> None:
    """Only mmap is cached: what the host writes after the guest read a file is what
    the guest reads next (as with runc, where both see one file)."""
    vm, loop = sandbox
    (rootfs / "changing").write_text("first\n")
    assert loop.run_until_complete(_run(vm, "read-1", "/bin/cat", f"{GUEST_ROOT}/changing")) == (
        0,
        b"first\n",
    )
    (rootfs / "changing").write_text("second, longer\n")
    assert loop.run_until_complete(_run(vm, "read-2", "/bin/cat", f"{GUEST_ROOT}/changing")) == (
        0,
        b"second, longer\n",
    )
