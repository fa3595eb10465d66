"""Block disks in a real amd64 and arm64 guest, as an erofs rootfs brings them: an erofs
layer (read-only) and a writable ext4 image, found by their virtio serials, mounted by the
agent and stacked under an overlay, as the guest assembles a container's rootfs
(harpoon.shim.transform.guest_rootfs)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.devenv.tools import EROFS_UTILS
from harpoon.sandbox.plan import plan_launch
from harpoon.sandbox.sandbox import Sandbox
from harpoon.vmm.backend import QemuBackend
from harpoon.vmm.base import Disk, VMConfig
from tests.vm.guests import GUEST_ARCHES, guest_for

if TYPE_CHECKING:
    from tests.vm.conftest import RunInGuest

pytestmark = pytest.mark.vm
BACKEND = QemuBackend()
DEVICE_WAIT_S = 30.0


def make_images(directory: Path) -> tuple[Path, Path]:
    """An erofs image holding /greeting (block size 4096, as the guest's 4K pages need)
    and an empty 16 MiB ext4 image."""
    if EROFS_UTILS.missing_binaries():
        if os.environ.get("CI"):
            raise RuntimeError(f"no mkfs.erofs: {EROFS_UTILS.install_hint()}")
        pytest.skip(f"no mkfs.erofs: {EROFS_UTILS.install_hint()}")
    tree = directory / "tree"
    tree.mkdir()
    (tree / "greeting").write_text("hello from an erofs layer\n")
    layer = directory / "layer.erofs"
    mkfs_erofs = str(EROFS_UTILS.cache_dir / "mkfs.erofs")
    subprocess.run([mkfs_erofs, "-b4096", str(layer), str(tree)], check=True, capture_output=True)
    writable = directory / "rw.img"
    with open(writable, "wb") as image:
        image.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(writable)], check=True, capture_output=True)
    return layer, writable


@pytest.fixture(scope="module", params=GUEST_ARCHES)
def started(request: pytest.FixtureRequest) -> Iterator[tuple[Sandbox, asyncio.AbstractEventLoop]]:
    guest = guest_for(request.param)
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="hp-disks-") as scratch:
        layer, writable = make_images(Path(scratch))
        state = Path(scratch, "vm")
        state.mkdir()
        config = VMConfig(
            name="disks", arch=guest.arch, kernel=guest.kernel, initrd=guest.initrd,
            state_dir=state,
            disks=(Disk("layer0", layer), Disk("rwlayer", writable, read_only=False)),
        )  # fmt: skip
        sandbox = Sandbox(plan_launch(config, BACKEND, False), BACKEND)
        loop.run_until_complete(sandbox.start())
        try:
            yield sandbox, loop
        finally:
            loop.run_until_complete(sandbox.stop())
            loop.close()


def test_the_disks_mount_by_serial_and_stack_as_a_rootfs(
    started: tuple[Sandbox, asyncio.AbstractEventLoop], guest_process: RunInGuest
) -> None:
    sandbox, loop = started
    agent = sandbox.agent
    assert agent is not None

    async def scenario() -> tuple[tuple[int, bytes, bytes], ...]:
        layer = await agent.wait_device(agent_pb2.WaitDeviceRequest.BLOCK, "layer0", DEVICE_WAIT_S)
        rw = await agent.wait_device(agent_pb2.WaitDeviceRequest.BLOCK, "rwlayer", DEVICE_WAIT_S)
        assert layer != rw and layer.startswith("/dev/vd") and rw.startswith("/dev/vd")
        made = await guest_process(
            agent, "mkdirs", "/bin/mkdir", "-p", "/mnt/l", "/mnt/rw", "/mnt/root"
        )
        assert made[0] == 0, made
        await agent.mount(layer, "/mnt/l", "erofs", ["ro"])
        await agent.mount(rw, "/mnt/rw", "ext4", [])
        dirs = await guest_process(agent, "dirs", "/bin/mkdir", "/mnt/rw/upper", "/mnt/rw/work")
        assert dirs[0] == 0, dirs
        options = ["lowerdir=/mnt/l", "upperdir=/mnt/rw/upper", "workdir=/mnt/rw/work"]
        await agent.mount("overlay", "/mnt/root", "overlay", options)
        read = await guest_process(agent, "read", "/bin/cat", "/mnt/root/greeting")
        write_layer = await guest_process(agent, "w1", "/bin/sh", "-c", "echo x > /mnt/l/new")
        write_root = await guest_process(
            agent,
            "w2",
            "/bin/sh",
            "-c",
            "echo changed > /mnt/root/greeting && cat /mnt/rw/upper/greeting",
        )
        return read, write_layer, write_root

    read, write_layer, write_root = loop.run_until_complete(asyncio.wait_for(scenario(), 180))
    assert read == (0, b"hello from an erofs layer\n", b"")
    assert write_layer[0] != 0 and b"Read-only file system" in write_layer[2], write_layer
    assert write_root == (0, b"changed\n", b""), write_root
