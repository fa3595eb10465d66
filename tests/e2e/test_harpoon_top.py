"""`harpoon top`: a container's processes as its VM sees them, the same as `ps` run in
the container shows (pids of its own namespace, users of its own /etc/passwd); a runc
container and an unknown one get an error that says so."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from harpoon.devenv.containerd import Containerd
from tests.e2e.differential import HARPOON, RUNC
from tests.e2e.test_harpoon_run import RUN_TIMEOUT_S, remove, wait_until_running

pytestmark = pytest.mark.vm

#: Two processes that stay: init (`sleep 1002`, exec'd by sh) and its child.
SCRIPT = "sleep 1001 & exec sleep 1002"


def harpoon_top(containerd: Containerd, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harpoon.cli", "top", "--namespace", containerd.namespace,
         "--containerd-state", str(containerd.state_dir), name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def started(containerd: Containerd, image: str, runtime: str) -> str:
    container_id = f"top-{secrets.token_hex(4)}"
    containerd.ctr("run", "-d", "--runtime", runtime, image, container_id, "sh", "-c", SCRIPT,
                   timeout=RUN_TIMEOUT_S)  # fmt: skip
    wait_until_running(containerd, container_id)
    return container_id


def ps_inside(containerd: Containerd, container_id: str) -> list[tuple[str, ...]]:
    """(PID, PPID, USER, COMMAND) of each process but ps itself, from busybox's ps."""
    out = containerd.ctr("task", "exec", "--exec-id", f"ps-{secrets.token_hex(3)}",
                         container_id, "ps", "-o", "pid,ppid,user,args").stdout  # fmt: skip
    rows = [tuple(line.split(None, 3)) for line in out.splitlines()[1:]]
    return [row for row in rows if not row[3].startswith("ps ")]


def test_top_shows_the_processes_ps_shows_inside_the_container(
    containerd: Containerd, busybox_image: str
) -> None:
    container_id = started(containerd, busybox_image, HARPOON)
    try:
        inside = ps_inside(containerd, container_id)
        listed = harpoon_top(containerd, container_id[:8])
    finally:
        remove(containerd, container_id)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
    rows = [line.split(None, 7) for line in lines[1:]]
    assert [(r[1], r[2], r[0], r[7]) for r in rows] == inside
    assert inside == [("1", "0", "root", "sleep 1002"), (inside[1][0], "1", "root", "sleep 1001")]


def test_top_of_a_runc_container_and_of_none_says_why_not(
    containerd: Containerd, busybox_image: str
) -> None:
    container_id = started(containerd, busybox_image, RUNC)
    try:
        under_runc = harpoon_top(containerd, container_id)
    finally:
        remove(containerd, container_id)
    assert under_runc.returncode == 1
    assert f"'{container_id}' does not run under harpoon" in under_runc.stderr
    unknown = harpoon_top(containerd, "no-such-container")
    assert unknown.returncode == 1
    assert "no running task 'no-such-container'" in unknown.stderr
