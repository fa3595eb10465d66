"""The erofs snapshotter (containerd >= 2.2, block mode): the layers and the writable
ext4 image are the VM's disks, the guest assembles the overlay, nothing is mounted on
the host, and the container's writes land in the image. (With overlayfs and native,
where they land is tested in tests/e2e/test_harpoon_binds.py.)"""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.devenv.containerd import EROFS_SNAPSHOTTER, Containerd
from harpoon.devenv.host import mount_points
from harpoon.devenv.images import build_layered_busybox_image
from harpoon.devenv.tools import EROFS_UTILS, scripts_dir
from harpoon.shim import paths
from tests.e2e.leaks import loop_backing_files
from tests.prerequisites import unavailable

HARPOON = "io.containerd.harpoon.v1"
RUN_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
GC_TIMEOUT_S = 30.0
WRITTEN = "written in the guest"


def task_status(daemon: Containerd, container_id: str) -> str:
    for line in daemon.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return fields[-1]
    return ""


def stop_and_delete_task(daemon: Containerd, container_id: str) -> None:
    if task_status(daemon, container_id) not in ("", "STOPPED"):
        daemon.ctr("task", "kill", "--signal", "SIGKILL", container_id, check=False)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while task_status(daemon, container_id) not in ("", "STOPPED"):
        assert time.monotonic() < deadline, f"task {container_id} did not stop"
        time.sleep(0.2)
    if task_status(daemon, container_id):
        daemon.ctr("task", "delete", container_id)


@pytest.fixture(scope="module")
def erofs_daemon() -> Iterator[Containerd]:
    """containerd 2.3 with the erofs snapshotter in block mode (its own: the session's is
    overlayfs); its shims see the caller's environment (guest image, template store)."""
    if EROFS_UTILS.missing_binaries():
        unavailable(f"mkfs.erofs with --tar is not built: {EROFS_UTILS.install_hint()}")
    daemon = Containerd(
        "2.3", path_prepend=[scripts_dir()], log_level="debug", snapshotter=EROFS_SNAPSHOTTER
    )
    if daemon.flavour.missing_binaries():
        unavailable(f"containerd 2.3 is not built: {daemon.flavour.install_hint()}")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.remove_all_containers()
        daemon.stop()


def test_an_erofs_rootfs_is_assembled_in_the_guest_with_nothing_mounted_on_the_host(
    erofs_daemon: Containerd, busybox_tar: Path, container_id: str
) -> None:
    daemon = erofs_daemon
    image = daemon.import_image(busybox_tar)
    snapshots = daemon.root_dir / "io.containerd.snapshotter.v1.erofs" / "snapshots"
    assert list(snapshots.glob("*/layer.erofs")), "the erofs differ made no layer image"
    began = time.monotonic()
    daemon.ctr(
        "run", "-d", "--runtime", HARPOON, image, container_id,
        "sh", "-c", f"echo '{WRITTEN}' > /written-here && exec sleep 1000",
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    try:
        created_s = time.monotonic() - began
        seen = daemon.ctr(
            "task", "exec", "--exec-id", "look", container_id,
            # `run -d` returns once the init started, maybe before its echo: wait for it.
            "sh", "-c", "i=0; while [ ! -s /written-here ] && [ $i -lt 200 ]; do "
            "sleep 0.05; i=$((i+1)); done; "
            "cat /written-here; ls /bin/busybox; grep ' / ' /proc/mounts",
        ).stdout  # fmt: skip
        assert seen.startswith(f"{WRITTEN}\n/bin/busybox\n"), seen
        assert " overlay " in seen, seen  # the guest's overlay is the container's root
        # Nothing of the container is mounted on the host, nor attached to a loop device.
        under_daemon = [m for m in mount_points() if m.startswith(str(daemon.paths.base))]
        assert under_daemon == []
        assert not any(str(daemon.paths.base) in f for f in loop_backing_files())
        export = paths.share_dir(daemon.namespace, container_id)
        assert not any(m.startswith(str(export)) for m in mount_points())
        log = daemon.log_path.read_text(errors="replace")
        assert f"assembled the rootfs of {container_id} from 2 disks" in log
        stop_and_delete_task(daemon, container_id)
        # The write is in the container's writable image (the snapshot outlives the task).
        (image_file,) = snapshots.glob("*/rwlayer.img")
        written = subprocess.run(
            ["debugfs", "-R", "cat /upper/written-here", str(image_file)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert written == WRITTEN + "\n"
        print(f"erofs container created in {created_s:.2f} s")
    finally:
        stop_and_delete_task(daemon, container_id)
        daemon.ctr("container", "delete", container_id, check=False)
    # Nothing left: no writable image (removed by containerd's garbage collection, soon
    # after the container), no shim, no mount, no share.
    deadline = time.monotonic() + GC_TIMEOUT_S
    while list(snapshots.glob("*/rwlayer.img")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(snapshots.glob("*/rwlayer.img")) == []
    assert not _shims_left(daemon)
    assert daemon.mounts() == []
    assert not export.exists()


def _shims_left(daemon: Containerd) -> bool:
    deadline = time.monotonic() + 10
    while daemon.shims() and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(daemon.shims())


@pytest.fixture
def busybox_tar(busybox_image_tar: Path) -> Path:
    return busybox_image_tar


def layer(*files: tuple[str, bytes]) -> bytes:
    """An uncompressed layer tar: `etc/` and the files given (a `.wh.` name deletes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        directory = tarfile.TarInfo("etc")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_layers_of_an_erofs_image_stack_in_order_with_whiteouts(
    erofs_daemon: Containerd, container_id: str, tmp_path: Path
) -> None:
    daemon = erofs_daemon
    tar = build_layered_busybox_image(
        tmp_path / "layered.oci.tar",
        "docker.io/library/busybox:layered",
        [
            layer(("etc/motd", b"middle\n"), ("etc/.wh.group", b"")),
            layer(("etc/motd", b"top\n")),
        ],
    )
    image = daemon.import_image(tar)
    result = daemon.ctr(
        "run", "--rm", "--runtime", HARPOON, image, container_id,
        "sh", "-c", "cat /etc/motd; test -e /etc/group || echo no-group; ls /bin/busybox",
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert result.stdout == "top\nno-group\n/bin/busybox\n"
    log = daemon.log_path.read_text(errors="replace")
    assert f"assembled the rootfs of {container_id} from 4 disks" in log
    daemon.ctr("image", "rm", image)


def test_the_macs_way_erofs_disks_and_binds_as_shares_mount_nothing_on_the_host(
    busybox_tar: Path, container_id: str, tmp_path: Path
) -> None:
    """What a Mac does, where the host cannot mount at all: the rootfs from erofs disks,
    and a directory and a file bound as shares of their own (HARPOON_BIND_SHARES=1 in
    the shims' environment, as on macOS without it); nothing of the container is
    mounted on the host, and nothing is left after it."""
    from harpoon.sandbox import bind_shares

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from the host\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    daemon = Containerd(
        "2.3",
        path_prepend=[scripts_dir()],
        log_level="debug",
        snapshotter=EROFS_SNAPSHOTTER,
        extra_env={bind_shares.ENV: "1"},
    )
    if daemon.flavour.missing_binaries():
        unavailable(f"containerd 2.3 is not built: {daemon.flavour.install_hint()}")
    with daemon:
        image = daemon.import_image(busybox_tar)
        mounts = [
            "--mount", f"type=bind,src={shared},dst=/data,options=rbind:rw",
            "--mount", f"type=bind,src={tmp_path / 'hosts'},dst=/etc/hosts,options=bind:ro",
        ]  # fmt: skip
        daemon.ctr(
            "run", "-d", "--runtime", HARPOON, *mounts, image, container_id,
            "sh", "-c", "cat /data/in.txt > /data/out.txt && exec sleep 1000",
            timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
        export = paths.share_dir(daemon.namespace, container_id)
        try:
            seen = daemon.ctr(
                "task", "exec", "--exec-id", "look", container_id,
                "sh", "-c", "cat /etc/hosts; echo x > /etc/hosts",
                check=False,
            )  # fmt: skip
            assert seen.stdout == "127.0.0.1 localhost\n"
            assert "Read-only file system" in seen.stderr, seen.stderr
            assert (shared / "out.txt").read_text() == "from the host\n"
            # No mount point, nor any mount's source, of the container's or of the binds'.
            named = [container_id, str(daemon.paths.base), str(export), str(tmp_path)]
            mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
            assert [m for m in mountinfo if any(n in m for n in named)] == []
        finally:
            stop_and_delete_task(daemon, container_id)
            daemon.ctr("container", "delete", container_id, check=False)
        assert not _shims_left(daemon)
        assert not export.exists()
        assert not paths.vm_state_dir(daemon.namespace, container_id).exists()
