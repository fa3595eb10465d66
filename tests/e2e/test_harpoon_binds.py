"""Host paths in the container through `ctr run --mount` (containerd 1.6 and 2.3): bind
mounts of directories and single files, read-write and read-only, a file the host
rewrites while the container runs, tmpfs mounts, and mounts harpoon must refuse.

Every test runs both ways a bind reaches the VM (BIND_WAYS):
- "host-mounts", Linux's default: served through the VM's share (harpoon.sandbox.binds):
  the guest sees the export's `mounts/<n>`, so what the export holds is what the guest
  can reach;
- "shares", the way of a host that cannot bind mount (macOS; here a containerd whose
  shims get HARPOON_BIND_SHARES=1): each bound directory (a file's parent) is a share
  of the VM of its own, mounted in the guest, and nothing is mounted on the host
  (harpoon.sandbox.bind_shares).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.tools import Flavour, scripts_dir
from harpoon.sandbox import bind_shares
from harpoon.sandbox.binds import MOUNTS_NAME
from harpoon.shim import paths
from tests.e2e.leaks import fail_on_leaks
from tests.e2e.test_harpoon_run import (
    HARPOON,
    RUN_TIMEOUT_S,
    leftovers,
    remove,
    run,
    start_sleeper,
)

pytestmark = pytest.mark.vm

BIND_WAYS = ("host-mounts", "shares")


@pytest.fixture(scope="module", params=BIND_WAYS)
def bind_way(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def bind_daemon(
    bind_way: str, usable_flavour: Flavour, request: pytest.FixtureRequest
) -> Iterator[Containerd]:
    """The session's containerd for host mounts; for shares, one of this module's whose
    shims take that way (HARPOON_BIND_SHARES=1 in their environment, inherited)."""
    if bind_way == "host-mounts":
        yield request.getfixturevalue("containerd_session")
        return
    log_dir = os.environ.get("HARPOON_LOG_DIR")
    daemon = Containerd(
        usable_flavour,
        path_prepend=[scripts_dir()],
        log_dir=Path(log_dir) if log_dir else None,
        log_level="debug",
        extra_env={bind_shares.ENV: "1"},
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.remove_all_containers()
        daemon.stop()


@pytest.fixture(scope="module")
def bind_image(bind_daemon: Containerd, busybox_image_tar: Path) -> str:
    return bind_daemon.import_image(busybox_image_tar)


@pytest.fixture
def containerd(bind_daemon: Containerd) -> Iterator[Containerd]:
    """This way's containerd; the test must leave no task, container, shim or mount."""
    yield bind_daemon
    fail_on_leaks(bind_daemon)


@pytest.fixture
def busybox_image(bind_image: str) -> str:
    return bind_image


def host_mounts_naming(path: Path) -> list[str]:
    """The host's mounts (in the shims' namespace) whose source or mount point names
    path or a path under it."""
    with open("/proc/self/mountinfo") as mountinfo:
        return [line for line in mountinfo if str(path) in line]


@pytest.fixture
def host_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "shared"
    directory.mkdir()
    (directory / "in.txt").write_text("from the host\n")
    yield directory


def bind(source: Path, destination: str, *options: str) -> list[str]:
    return ["--mount", f"type=bind,src={source},dst={destination},options={':'.join(options)}"]


def run_with(
    containerd: Containerd, image: str, container_id: str, mounts: list[str], script: str
) -> tuple[int, str, str]:
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, *mounts, image, container_id, "sh", "-c", script,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def test_a_read_write_bind_reads_host_files_and_writes_through_at_once(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path
) -> None:
    status, out, _ = run_with(
        containerd, busybox_image, container_id, bind(host_dir, "/data", "rbind", "rw"),
        "cat /data/in.txt; echo written > /data/out.txt; mkdir /data/d; "
        "touch /data/owned; chown 1000:1001 /data/owned; chmod 640 /data/owned",
    )  # fmt: skip
    assert (status, out) == (0, "from the host\n")
    assert (host_dir / "out.txt").read_text() == "written\n"
    # Owned as a runc container leaves them on the host: root's, or as chowned.
    made = os.stat(host_dir / "out.txt")
    assert (made.st_uid, made.st_gid) == (0, 0)
    owned = os.stat(host_dir / "owned")
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 1001, 0o640)
    assert (host_dir / "d").is_dir()
    assert leftovers(containerd, container_id) == []


def test_a_read_only_bind_refuses_writes_with_erofs(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path
) -> None:
    status, out, err = run_with(
        containerd, busybox_image, container_id, bind(host_dir, "/data", "rbind", "ro"),
        "cat /data/in.txt; echo x > /data/in.txt; touch /data/new",
    )  # fmt: skip
    assert status == 1 and out == "from the host\n"
    assert err.count("Read-only file system") == 2, err
    assert sorted(os.listdir(host_dir)) == ["in.txt"]
    assert (host_dir / "in.txt").read_text() == "from the host\n"


def test_a_single_file_is_bound_and_its_changes_reach_a_running_container(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path, bind_way: str
) -> None:
    """As nerdctl binds /etc/hosts, and rewrites it (in place) when its network grows.
    With host mounts the guest reaches the file alone; as shares, its directory (the
    container still sees the file alone)."""
    hosts = host_dir / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    (host_dir / "secret").write_text("a sibling the guest must not see with host mounts\n")
    containerd.ctr(
        "run", "-d", "--runtime", HARPOON, *bind(hosts, "/etc/hosts", "bind", "ro"),
        busybox_image, container_id, "sleep", "1000", timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    try:
        export = paths.share_dir(containerd.namespace, container_id)
        if bind_way == "host-mounts":
            # The guest's view of the share is the export: the rootfs and the file alone.
            assert sorted(os.listdir(export / MOUNTS_NAME)) == ["0"]
            assert (export / MOUNTS_NAME / "0").read_text() == "127.0.0.1 localhost\n"
            assert stat.S_ISREG(os.stat(export / MOUNTS_NAME / "0").st_mode)
        else:
            assert not (export / MOUNTS_NAME).exists()
            assert host_mounts_naming(host_dir) == []

        def cat_hosts(exec_id: str) -> str:
            return containerd.ctr(
                "task", "exec", "--exec-id", exec_id, container_id, "cat", "/etc/hosts"
            ).stdout

        assert cat_hosts("before") == "127.0.0.1 localhost\n"
        hosts.write_text("127.0.0.1 localhost\n10.4.0.7 web\n")  # in place: same inode
        assert cat_hosts("after") == "127.0.0.1 localhost\n10.4.0.7 web\n"
    finally:
        remove(containerd, container_id)
    assert leftovers(containerd, container_id) == []


def test_nested_binds_apply_in_spec_order_onto_paths_the_image_lacks(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path, tmp_path: Path
) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "deep.txt").write_text("inner\n")
    mounts = bind(host_dir, "/new/outer", "rbind", "rw") + bind(inner, "/new/outer/in", "rbind")
    status, out, _ = run_with(
        containerd, busybox_image, container_id, mounts,
        "cat /new/outer/in.txt /new/outer/in/deep.txt",
    )  # fmt: skip
    assert (status, out) == (0, "from the host\ninner\n")


def test_a_tmpfs_mount_has_the_size_asked_for(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    mount = ["--mount", "type=tmpfs,src=tmpfs,dst=/scratch,options=size=16m"]
    status, out, _ = run_with(
        containerd, busybox_image, container_id, mount, "df -k /scratch | tail -1"
    )
    assert status == 0
    assert out.split()[1] == str(16 * 1024), out


@pytest.mark.parametrize(
    ("source", "words"),
    [("/no/such/dir", "the source does not exist")],
)
def test_a_mount_that_cannot_be_served_fails_create_naming_it_and_leaves_nothing(
    containerd: Containerd, busybox_image: str, container_id: str, source: str, words: str
) -> None:
    status, _, err = run_with(
        containerd, busybox_image, container_id, bind(Path(source), "/data", "rbind"), "true"
    )
    assert status != 0
    assert words in err and "/data" in err, err
    containerd.ctr("container", "delete", container_id, check=False)
    assert leftovers(containerd, container_id) == []


def test_a_container_without_binds_is_unaffected(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    """Its export has no mounts/ at all."""
    start_sleeper(containerd, busybox_image, container_id)
    try:
        export = paths.share_dir(containerd.namespace, container_id)
        assert not (export / MOUNTS_NAME).exists()
    finally:
        remove(containerd, container_id)
    assert run(containerd, busybox_image, f"{container_id}-2", "true") == (0, "")


@pytest.mark.xfail(
    strict=True,
    reason="Debian's QEMU 7.2 9p server refuses to set up a special file it just made "
    "('9p: broken or compromised client detected; attempt to open special file'): its "
    "CVE-2023-2861 fix checks O_PATH opens too; mkfifo and mknod fail with ENXIO",
)
def test_fifos_and_device_nodes_can_be_made_on_a_bind_as_under_runc(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path
) -> None:
    status, out, err = run_with(
        containerd, busybox_image, container_id, bind(host_dir, "/data", "rbind", "rw"),
        "mkfifo /data/fifo && mknod /data/null c 1 3 && echo made",
    )  # fmt: skip
    assert (status, out) == (0, "made\n"), err
    assert stat.S_ISFIFO(os.lstat(host_dir / "fifo").st_mode)


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_a_file_written_in_the_rootfs_lands_in_the_snapshot_on_the_host(
    containerd: Containerd, busybox_image: str, container_id: str, snapshotter: str, bind_way: str
) -> None:
    """The rootfs is containerd's snapshot, mounted on the host and shared into the VM:
    what the container writes is in the snapshot's directory (overlayfs: its upper)."""
    if bind_way != "host-mounts":
        pytest.skip("no bind: the rootfs takes the same way either way")
    name = f"written-{container_id}.txt"
    containerd.ctr(
        "run", "-d", "--snapshotter", snapshotter, "--runtime", HARPOON, busybox_image,
        container_id, "sh", "-c", f"echo in the rootfs > /{name}; sleep 1000",
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    try:
        snapshots = containerd.root_dir / f"io.containerd.snapshotter.v1.{snapshotter}"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # overlayfs keeps a snapshot's files in snapshots/<n>/fs, native in snapshots/<n>.
        inside = "*/fs" if snapshotter == "overlayfs" else "*"
        while not (found := list(snapshots.glob(f"snapshots/{inside}/{name}"))):
            assert time.monotonic() < deadline, f"{name} never reached {snapshots}"
            time.sleep(0.2)
        [written] = found
        assert written.read_text() == "in the rootfs\n"
    finally:
        remove(containerd, container_id)
    assert leftovers(containerd, container_id) == []


def test_an_init_whose_executable_is_bound_in_runs_as_under_runc(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    """The executable exists only once the bind is mounted (shimtest's testbin, a tool
    from the host): found by exec, not refused before."""
    tool = bind(Path("/bin/busybox"), "/opt/echo", "rbind", "ro")  # busybox: by its name
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, *tool, busybox_image, container_id,
        "/opt/echo", "bound", timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert result.stdout == "bound\n"


def test_as_shares_nothing_of_a_bind_is_mounted_on_the_host(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path, bind_way: str
) -> None:
    """The way of a host that cannot bind mount: directories and files, read-write and
    read-only, bound with no host mount at all; the VM boots cold, no template made."""
    if bind_way != "shares":
        pytest.skip("host mounts bind on the host")
    (host_dir / "ro").mkdir()
    (host_dir / "ro" / "kept.txt").write_text("kept\n")
    (host_dir / "hosts").write_text("127.0.0.1 localhost\n")
    mounts = (
        bind(host_dir, "/rw", "rbind", "rw")
        + bind(host_dir / "ro", "/ro", "rbind", "ro")
        + bind(host_dir / "hosts", "/etc/hosts", "bind", "ro")
    )
    containerd.ctr(
        "run", "-d", "--runtime", HARPOON, *mounts, busybox_image, container_id,
        "sh", "-c", "echo up > /rw/up.txt; exec sleep 1000", timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    try:
        export = paths.share_dir(containerd.namespace, container_id)
        seen = containerd.ctr(
            "task", "exec", "--exec-id", "look", container_id, "sh", "-c",
            "cat /rw/up.txt /ro/kept.txt /etc/hosts; echo x > /ro/kept.txt; "
            "echo x > /etc/hosts; echo written > /rw/out.txt",
            check=False,
        )  # fmt: skip
        assert seen.stdout == "up\nkept\n127.0.0.1 localhost\n", seen.stderr
        assert seen.stderr.count("Read-only file system") == 2, seen.stderr
        assert (host_dir / "out.txt").read_text() == "written\n"
        assert (host_dir / "ro" / "kept.txt").read_text() == "kept\n"
        # No host mount names a bound path, and the export holds no mounts/.
        assert host_mounts_naming(host_dir) == []
        assert not (export / MOUNTS_NAME).exists()
        log = containerd.log_path.read_text(errors="replace")
        assert f"{container_id}: host binds shared as devices of their own: booting cold" in log
    finally:
        remove(containerd, container_id)
    assert leftovers(containerd, container_id) == []
    assert host_mounts_naming(host_dir) == []


def test_a_create_that_fails_once_the_binds_are_in_the_vm_leaves_nothing(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path
) -> None:
    """crun refuses a file bound over the image's /etc directory: Create fails after the
    VM started and its binds were served, and everything goes."""
    (host_dir / "file").write_text("not a directory\n")
    mounts = bind(host_dir, "/data", "rbind") + bind(host_dir / "file", "/etc", "bind")
    status, _, err = run_with(containerd, busybox_image, container_id, mounts, "true")
    assert status != 0 and "crun create failed" in err and "Not a directory" in err, err
    containerd.ctr("container", "delete", container_id, check=False)
    assert leftovers(containerd, container_id) == []
    assert host_mounts_naming(host_dir) == []
