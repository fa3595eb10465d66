"""The erofs snapshotter's rootfs mounts, planned as disks and guest mounts (containerd
2.3's shapes, as Create brings them to a runtime that handles erofs itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harpoon.api.containerd.types import mount_pb2
from harpoon.errdefs import InvalidArgument
from harpoon.shim.transform.guest_rootfs import (
    GUEST_ROOT,
    MOUNT_ROOT,
    needs_guest,
    plan_guest_rootfs,
)
from harpoon.vmm.devices import Disk

SNAP = "/c/root/io.containerd.snapshotter.v1.erofs/snapshots"
OVERLAY_OPTIONS = [
    "X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
    "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
    "workdir={{ mount 0 }}/work",
    "upperdir={{ mount 0 }}/upper",
]


def mount(type_: str, source: str, *options: str) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=type_, source=source, options=list(options))


def erofs_rootfs(layers: int) -> list[mount_pb2.Mount]:
    lower = "lowerdir={{ mount 1 }}" if layers == 1 else f"lowerdir={{{{ overlay 1 {layers} }}}}"
    return [
        mount("ext4", f"{SNAP}/9/rwlayer.img", "rw", "loop"),
        *(mount("erofs", f"{SNAP}/{n}/layer.erofs", "ro", "loop") for n in range(1, layers + 1)),
        mount("format/mkdir/overlay", "overlay", *OVERLAY_OPTIONS, lower),
    ]


def test_only_the_erofs_snapshotters_mounts_are_assembled_in_the_guest() -> None:
    assert needs_guest(erofs_rootfs(1))
    overlayfs = [mount("overlay", "overlay", "lowerdir=/a", "upperdir=/b", "workdir=/c")]
    assert not needs_guest(overlayfs) and not needs_guest([])


def test_one_layer_becomes_two_disks_and_an_overlay_on_the_writable_image() -> None:
    planned = plan_guest_rootfs(erofs_rootfs(1))
    assert planned.disks == (
        Disk("rootfs0", Path(f"{SNAP}/9/rwlayer.img"), read_only=False),
        Disk("rootfs1", Path(f"{SNAP}/1/layer.erofs"), read_only=True),
    )
    ext4, layer, overlay = planned.mounts
    assert (ext4.disk, ext4.target, ext4.fstype, ext4.options) == (
        "rootfs0",
        f"{MOUNT_ROOT}/0",
        "ext4",
        ("rw",),
    )
    assert (layer.disk, layer.fstype, layer.options) == ("rootfs1", "erofs", ("ro",))
    assert (overlay.target, overlay.fstype, overlay.disk) == (GUEST_ROOT, "overlay", None)
    assert overlay.options == (
        f"X-containerd.mkdir.path={MOUNT_ROOT}/0/upper:0755",
        f"X-containerd.mkdir.path={MOUNT_ROOT}/0/work:0755",
        f"workdir={MOUNT_ROOT}/0/work",
        f"upperdir={MOUNT_ROOT}/0/upper",
        f"lowerdir={MOUNT_ROOT}/1",
    )


def test_layers_are_stacked_in_containerds_order() -> None:
    overlay = plan_guest_rootfs(erofs_rootfs(3)).mounts[-1]
    assert overlay.options[-1] == f"lowerdir={MOUNT_ROOT}/1:{MOUNT_ROOT}/2:{MOUNT_ROOT}/3"
    reverse = erofs_rootfs(2)
    reverse[-1].options[-1] = "lowerdir={{ overlay 2 1 }}"
    assert plan_guest_rootfs(reverse).mounts[-1].options[-1] == (
        f"lowerdir={MOUNT_ROOT}/2:{MOUNT_ROOT}/1"
    )


def test_multi_device_erofs_and_odd_shapes_are_refused_naming_the_mount() -> None:
    merged = erofs_rootfs(1)
    merged[1].options.append("device=/x/layer.erofs")
    with pytest.raises(InvalidArgument, match=r"rootfs mount 1 .*multi-device"):
        plan_guest_rootfs(merged)
    bind_first = [mount("format/mkdir/bind", "{{ mount 0 }}/upper"), *erofs_rootfs(1)]
    with pytest.raises(InvalidArgument, match="rootfs mount 0"):
        plan_guest_rootfs(bind_first)
    missing = erofs_rootfs(1)
    missing[-1].options[-1] = "lowerdir={{ mount 7 }}"
    with pytest.raises(InvalidArgument, match="not disks"):
        plan_guest_rootfs(missing)


def test_a_single_erofs_view_is_the_root_itself() -> None:
    (only,) = plan_guest_rootfs([mount("erofs", f"{SNAP}/1/layer.erofs", "ro", "loop")]).mounts
    assert (only.target, only.fstype, only.disk) == (GUEST_ROOT, "erofs", "rootfs0")


def test_the_erofs_snapshotters_directory_mode_is_refused_for_block_mode() -> None:
    directory_mode = [
        mount("erofs", f"{SNAP}/1/layer.erofs", "ro", "loop"),
        mount("format/mkdir/overlay", "overlay", f"workdir={SNAP}/2/work",
              f"upperdir={SNAP}/2/fs", "lowerdir={{ mount 0 }}"),
    ]  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"directory mode.*default_size"):
        plan_guest_rootfs(directory_mode)
