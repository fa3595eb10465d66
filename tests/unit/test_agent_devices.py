"""The agent's device discovery (harpoon.agent.devices) against a fake sysfs: each kind
found by its id, a device that comes later found on the uevent that announces it, and
one that never comes reported after its timeout."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from harpoon.agent import devices
from harpoon.errdefs import DeadlineExceeded, InvalidArgument
from harpoon.ttrpc.status import Code

REAL_LOOPBACK_UEVENT = "/sys/class/net/lo/uevent"


def attribute(sys_root: Path, directory: str, name: str, attribute: str, value: str) -> None:
    device = sys_root / directory / name
    device.mkdir(parents=True, exist_ok=True)
    (device / attribute).write_text(value)


@pytest.fixture
def sys_root(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    attribute(root, "block", "vda", "serial", "rootfs-disk\n")
    attribute(root, "block", "vdb", "serial", "layer-1\n")
    (root / "block" / "loop0").mkdir()  # no serial at all
    attribute(root, "class/virtio-ports", "vport0p1", "name", "harpoon.agent\n")
    attribute(root, "class/virtio-ports", "vport0p3", "name", "extra\n")
    attribute(root, "class/net", "lo", "address", "00:00:00:00:00:00\n")
    attribute(root, "class/net", "eth0", "address", "52:54:00:12:34:56\n")
    return root


def test_a_block_device_is_found_by_its_serial(sys_root: Path) -> None:
    assert devices.find_device(devices.BLOCK, "layer-1", str(sys_root)) == "/dev/vdb"
    assert devices.find_device(devices.BLOCK, "rootfs-disk", str(sys_root)) == "/dev/vda"


def test_a_virtio_serial_port_is_found_by_its_name(sys_root: Path) -> None:
    assert devices.find_device(devices.VIRTIO_PORT, "extra", str(sys_root)) == "/dev/vport0p3"


def test_a_nic_is_found_by_its_mac_in_any_case_and_answers_its_name(sys_root: Path) -> None:
    assert devices.find_device(devices.NIC, "52:54:00:12:34:56", str(sys_root)) == "eth0"
    assert devices.find_device(devices.NIC, "52:54:00:12:34:56".upper(), str(sys_root)) == "eth0"


def test_an_id_matches_only_whole_and_only_its_own_kind(sys_root: Path) -> None:
    assert devices.find_device(devices.BLOCK, "layer", str(sys_root)) is None
    assert devices.find_device(devices.BLOCK, "extra", str(sys_root)) is None
    assert devices.find_device(devices.VIRTIO_PORT, "layer-1", str(sys_root)) is None


def test_a_class_the_guest_does_not_have_finds_nothing(tmp_path: Path) -> None:
    assert devices.find_device(devices.NIC, "52:54:00:12:34:56", str(tmp_path)) is None


def test_a_kernel_uevent_is_parsed_and_anything_else_is_not() -> None:
    message = b"add@/devices/virtual/net/eth1\0ACTION=add\0SUBSYSTEM=net\0INTERFACE=eth1\0"
    assert devices.parse_uevent(message) == {
        "ACTION": "add",
        "SUBSYSTEM": "net",
        "INTERFACE": "eth1",
    }
    assert devices.parse_uevent(b"libudev\0\xfe\xed\xca\xfe") == {}


def test_a_device_already_there_is_answered_at_once(sys_root: Path) -> None:
    found = asyncio.run(devices.wait_for_device(devices.BLOCK, "layer-1", 5, str(sys_root)))
    assert found == "/dev/vdb"


def test_a_device_that_never_comes_fails_after_its_timeout(sys_root: Path) -> None:
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        asyncio.run(devices.wait_for_device(devices.BLOCK, "never", 0.3, str(sys_root)))
    assert 0.3 <= time.monotonic() - began < 3
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert "no block device with id 'never' appeared in the guest within 0.3 s" in str(caught.value)


@pytest.mark.parametrize(
    ("kind", "device_id", "timeout_s"),
    [("disk", "x", 1), (devices.BLOCK, " ", 1), (devices.NIC, "x", 0), (devices.NIC, "x", 1e6)],
)
def test_a_bad_request_is_an_invalid_argument(kind: str, device_id: str, timeout_s: float) -> None:
    with pytest.raises(InvalidArgument):
        asyncio.run(devices.wait_for_device(kind, device_id, timeout_s))


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(REAL_LOOPBACK_UEVENT),
    reason="needs root to make the kernel send a uevent",
)
def test_a_device_that_comes_later_is_found_on_its_uevent(sys_root: Path) -> None:
    """The NIC appears in the fake sysfs while the wait sleeps; the kernel's `change`
    uevent of the host's own loopback (same subsystem) wakes the wait to look again."""

    async def scenario() -> tuple[str, float]:
        waiting = asyncio.ensure_future(
            devices.wait_for_device(devices.NIC, "52:54:00:ab:cd:ef", 10, str(sys_root))
        )
        await asyncio.sleep(0.2)
        assert not waiting.done()
        attribute(sys_root, "class/net", "eth1", "address", "52:54:00:ab:cd:ef\n")
        began = time.monotonic()
        with open(REAL_LOOPBACK_UEVENT, "w") as trigger:
            trigger.write("change")
        return await waiting, time.monotonic() - began

    try:
        found, elapsed = asyncio.run(scenario())
    except PermissionError as error:
        pytest.skip(f"no kernel uevents here: {error}")
    assert found == "eth1"
    assert elapsed < 5


def test_mkdir_options_are_split_from_a_mounts_own() -> None:
    from harpoon.agent.rootfs import split_mkdirs

    mkdirs, rest = split_mkdirs(
        ["X-containerd.mkdir.path=/d/0/upper:0755", "X-containerd.mkdir.path=/d/0/w:0700:1:2",
         "upperdir=/d/0/upper", "ro"]
    )  # fmt: skip
    assert mkdirs == [("/d/0/upper", 0o755, -1, -1), ("/d/0/w", 0o700, 1, 2)]
    assert rest == ["upperdir=/d/0/upper", "ro"]


def test_a_module_is_loaded_with_its_dependencies_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from harpoon import linux
    from harpoon.agent import modules

    loaded: list[str] = []
    monkeypatch.setattr(linux, "load_module", lambda path: loaded.append(path) or True)
    module_map = {"ext4": ["/m/crc16.ko", "/m/jbd2.ko", "/m/ext4.ko"]}
    modules.load("ext4", module_map, sys_root=str(tmp_path))
    modules.load("not-shipped", module_map, sys_root=str(tmp_path))
    (tmp_path / "module" / "ext4").mkdir(parents=True)
    modules.load("ext4", module_map, sys_root=str(tmp_path))  # the kernel has it now
    assert loaded == ["/m/crc16.ko", "/m/jbd2.ko", "/m/ext4.ko"]


def test_a_vm_with_a_virtio_disk_is_told_by_its_device_id(tmp_path: Path) -> None:
    from harpoon.agent import boot

    for name, device in (("virtio0", "0x0003"), ("virtio1", "0x0002")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "device").write_text(device + "\n")
    assert boot.has_virtio_disks(str(tmp_path))
    (tmp_path / "virtio1" / "device").write_text("0x0009\n")
    assert not boot.has_virtio_disks(str(tmp_path))
