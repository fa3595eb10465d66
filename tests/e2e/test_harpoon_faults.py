"""Faults a real containerd brings: containerd SIGKILLed and restarted while containers
are being created. (Faults under the shim itself, with the VM killed or hung at exact
points of the Task calls, are in tests/vm/test_shim_faults.py.)

Whatever each `ctr run` was doing when containerd died, afterwards every container
either runs (the restarted containerd found its shim) or can be deleted, a container
that ran before the storm runs on untouched, and once all are deleted nothing is left.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harpoon.devenv.containerd import Containerd
from tests.e2e.test_harpoon_run import (
    HARPOON,
    RUN_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ctr_command,
    delete_once_stopped,
    leftovers,
    remove,
    start_sleeper,
    task_states,
    wait_until_running,
)

pytestmark = pytest.mark.vm

STORM = 6
#: How long containerd lives into the storm before it is killed: its shims are then
#: starting, creating and running.
STORM_HEAD_START_S = 2.0
STAGGER_S = 0.5


def test_containerd_killed_during_a_create_storm_loses_and_leaks_nothing(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    bystander = f"{container_id}-by"
    start_sleeper(containerd, busybox_image, bystander)
    ids = [f"{container_id}-{n}" for n in range(STORM)]

    def create(cid: str, after_s: float) -> int:
        time.sleep(after_s)
        return subprocess.run(
            ctr_command(containerd, "run", "-d", "--runtime", HARPOON, busybox_image, cid,
                        "sleep", "1000"),
            capture_output=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL,
        ).returncode  # fmt: skip

    with ThreadPoolExecutor(STORM) as pool:
        # Staggered: when containerd dies, some are further along than others.
        creating = [pool.submit(create, cid, n * STAGGER_S) for n, cid in enumerate(ids)]
        time.sleep(STORM_HEAD_START_S)
        containerd.restart(kill=True)
        statuses = [c.result() for c in creating]
    print(f"ctr run exit statuses across the restart: {statuses}")

    # The bystander was running before: it runs on, and answers.
    wait_until_running(containerd, bystander)
    answer = containerd.ctr("task", "exec", "--exec-id", "check", bystander, "echo", "alive")
    assert answer.stdout == "alive\n"
    # A create that succeeded made a container that runs: its shim was found again.
    states = task_states(containerd)
    for cid, status in zip(ids, statuses, strict=True):
        if status == 0:
            assert states.get(cid) == "RUNNING", f"{cid} was created but is {states.get(cid)}"
    for cid in ids:
        remove(containerd, cid)
    deadline = time.monotonic() + STOP_TIMEOUT_S * 2
    while any(leftovers(containerd, cid) for cid in ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {cid: leftovers(containerd, cid) for cid in ids} == {cid: [] for cid in ids}
    containerd.ctr("task", "kill", "--signal", "SIGKILL", bystander)
    delete_once_stopped(containerd, bystander, 137, "the bystander did not stop")
