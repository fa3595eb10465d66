"""Many containers, concurrently and in a row: nothing leaks (VMs, sockets, mounts,
state directories, fds of containerd) and a shim's memory does not creep. Leftovers
are checked per container (other test sessions may run VMs at the same time).

Sizes default to what CI can afford under TCG; HARPOON_SOAK_CONCURRENT and
HARPOON_SOAK_CYCLES raise them (the issue asks for 20 and 100).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from tests.e2e.test_harpoon_run import (
    HARPOON,
    RUN_TIMEOUT_S,
    ctr_command,
    leftovers,
    start_sleeper,
)

pytestmark = pytest.mark.vm

CONCURRENT = int(os.environ.get("HARPOON_SOAK_CONCURRENT", "6"))
CYCLES = int(os.environ.get("HARPOON_SOAK_CYCLES", "12"))
FD_SETTLE_S = 15.0
FD_SLACK = 3


def fd_count(pid: int | None) -> int:
    return len(os.listdir(f"/proc/{pid}/fd")) if pid else 0


def assert_fds_settle(containerd: Containerd, before: int) -> None:
    """containerd closes shim connections a moment after a task goes: wait for that.
    A leak of one fd per container would leave it well above where it started."""
    deadline = time.monotonic() + FD_SETTLE_S
    while fd_count(containerd.pid) > before + FD_SLACK and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fd_count(containerd.pid) <= before + FD_SLACK


def test_concurrent_containers_all_run_and_leave_nothing(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    before_fds = fd_count(containerd.pid)
    ids = [f"{container_id}-{n}" for n in range(CONCURRENT)]

    def one(cid: str) -> tuple[int, str]:
        result = subprocess.run(
            ctr_command(containerd, "run", "--rm", "--runtime", HARPOON, busybox_image, cid,
                        "sh", "-c", f"echo {cid}"),
            capture_output=True, timeout=RUN_TIMEOUT_S * 2, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return result.returncode, result.stdout.decode()

    with ThreadPoolExecutor(CONCURRENT) as pool:
        results = list(pool.map(one, ids))
    assert results == [(0, f"{cid}\n") for cid in ids]
    for cid in ids:
        assert leftovers(containerd, cid) == []
    assert_fds_settle(containerd, before_fds)


def test_create_delete_cycles_leak_nothing_and_shim_memory_stays_flat(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    before_fds = fd_count(containerd.pid)
    shim_rss_kib: list[int] = []
    for cycle in range(CYCLES):
        cid = f"{container_id}-{cycle}"
        start_sleeper(containerd, busybox_image, cid)
        [shim] = [s for s in containerd.shims() if s.flag("id") == cid]
        status = Path(f"/proc/{shim.pid}/status").read_text()
        shim_rss_kib.append(int(status.split("VmRSS:")[1].split()[0]))
        containerd.ctr("task", "kill", "--signal", "SIGKILL", cid)
        deadline = time.monotonic() + 60
        while containerd.ctr("task", "delete", cid, check=False).returncode != 0:
            assert time.monotonic() < deadline, f"cycle {cycle}: the task never stopped"
            time.sleep(0.1)
        containerd.ctr("container", "delete", cid)
        assert leftovers(containerd, cid) == [], f"cycle {cycle}"
    assert_fds_settle(containerd, before_fds)
    # Each cycle has a fresh shim: the last ones must not be bigger than the first ones.
    half = len(shim_rss_kib) // 2
    early, late = statistics.median(shim_rss_kib[:half]), statistics.median(shim_rss_kib[half:])
    print(f"shim RSS over {CYCLES} cycles: first half {early} KiB, second half {late} KiB")
    assert late <= early * 1.15, f"shim RSS grew from {early} to {late} KiB"
    assert max(shim_rss_kib) < 60 * 1024, f"a shim used {max(shim_rss_kib)} KiB"
