"""runc under the harness: the behaviour harpoon's own e2e tests are compared against.

These prove that `harpoon.devenv` gives a working containerd of each flavour with the
busybox image, and record what `io.containerd.runc.v2` does for the same commands.
"""

from __future__ import annotations

from pathlib import Path

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.host import alive
from harpoon.devenv.tools import Flavour

RUNC = "io.containerd.runc.v2"
#: Timeout of one short `ctr run` (runc takes ~0.2 s).
RUN_TIMEOUT_S = 60.0


def run(containerd: Containerd, image: str, container_id: str, *argv: str) -> tuple[int, str]:
    result = containerd.ctr(
        "run", "--rm", "--runtime", RUNC, image, container_id, *argv,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout


def test_daemon_reports_the_pinned_version(containerd: Containerd) -> None:
    assert containerd.version.startswith(containerd.flavour.version)


def test_echo_prints_its_argument(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    assert run(containerd, busybox_image, container_id, "echo", "hello") == (0, "hello\n")


def test_exit_status_is_the_container_process_status(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    status, _ = run(containerd, busybox_image, container_id, "sh", "-c", "exit 3")
    assert status == 3


def test_image_environment_and_users_are_present(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    status, out = run(
        containerd, busybox_image, container_id, "sh", "-c", 'echo "$PATH"; id -un; ls -d /tmp'
    )
    assert status == 0
    assert out.splitlines() == [
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "root",
        "/tmp",
    ]


def test_rm_leaves_no_container_shim_or_mount(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    assert run(containerd, busybox_image, container_id, "true") == (0, "")
    assert container_id not in containerd.containers()
    assert [m for m in containerd.mounts() if container_id in m] == []
    assert not any(s.flag("id") == container_id for s in containerd.shims())


def test_task_survives_containerd_restart_and_stop_kills_its_shim(
    usable_flavour: Flavour, busybox_image_tar: Path, container_id: str
) -> None:
    # A private daemon: this test stops it with a task still running, on purpose.
    daemon = Containerd(usable_flavour).start()
    try:
        image = daemon.import_image(busybox_image_tar)
        daemon.ctr("run", "-d", "--runtime", RUNC, image, container_id, "sleep", "1000")
        [shim] = daemon.shims()
        daemon.restart()
        assert container_id in daemon.tasks()
        assert daemon.ctr("task", "ls").stdout.split()[-1] == "RUNNING"
        assert daemon.shims() == [shim]
        base = daemon.paths.base
    finally:
        report = daemon.stop()
    assert report.leaked_shims == [shim]
    assert report.killed_pids
    assert not any(alive(pid) for pid in report.killed_pids)
    # runc's machine-wide state, the cgroup and ctr's FIFOs go too, so the ID is reusable.
    assert report.deleted_runc_containers == [container_id]
    assert not list(Path("/sys/fs/cgroup").glob(f"**/{container_id}"))
    assert report.removed_fifos
    assert not base.exists()
    assert [
        line for line in Path("/proc/mounts").read_text().splitlines() if str(base) in line
    ] == []
