"""Load (issue 13): containers created concurrently, exec'd into and deleted, round after
round, with containerd SIGKILLed and restarted once, in the middle round, while that
round's containers run. Every exit status is delivered: an exec's to `ctr task exec`,
an init's to `ctr task delete`, both as /tasks/exit events too; in the restart round,
half the inits exit while containerd is down, and `ctr task delete` still reports their
status once it is back. Nothing is left behind after a round, and memory does not
creep: the medians of the last round are within 5% of the first round's.

Measured per container, after its exec:
- the shim: VmRSS of its daemon on the host;
- the VMM: VmRSS of its QEMU on the host (the guest RAM it has touched);
- the guest: `MemTotal - MemAvailable` ("used") and `AnonPages` of the guest's
  /proc/meminfo, which the exec prints. The agent's own RSS is out of reach: the agent
  is PID 1 of the guest, outside the container's pid namespace, and no agent call
  reports it. The guest's anonymous memory is mostly the agent's heap (the container
  runs `sleep`), so it stands in for it.

Sizes: HARPOON_LOAD_CONTAINERS and HARPOON_LOAD_ROUNDS (at least 3: the restart is in
the middle one). The issue's size, 20 containers for 10 rounds, takes 7-8 minutes per
containerd flavour under TCG on 2 shared cores (35-55 s a round): the defaults are what
CI affords, 10 containers for 3 rounds (~1 minute per flavour), and `scripts/soak` runs
the issue's size.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.shim import paths
from tests.e2e.test_harpoon_run import HARPOON, ctr_command, leftovers, vm_processes

pytestmark = pytest.mark.vm

CONTAINERS = int(os.environ.get("HARPOON_LOAD_CONTAINERS", "10"))
ROUNDS = max(3, int(os.environ.get("HARPOON_LOAD_ROUNDS", "3")))
#: The round whose containers see containerd SIGKILLed and started again.
RESTART_ROUND = ROUNDS // 2
#: How far the last round's median may be from the first round's.
RSS_TOLERANCE = 0.05
#: What each exec exits with: a status a client can only have from the guest.
EXEC_STATUS = 7
#: In the restart round, half the containers' inits exit while containerd is down: each
#: polls for a file the test makes in its rootfs (seen through the VM's 9p share), and
#: leaves another just before it exits.
STOP_FILE, EXITED_FILE = "load-stop", "load-exited"
DOWNTIME_EXIT_STATUS = 3
POLLING_INIT = (
    f"until [ -e /{STOP_FILE} ]; do sleep 1; done; touch /{EXITED_FILE}; "
    f"exit {DOWNTIME_EXIT_STATUS}"
)
#: How long containerd stays down once those inits are about to exit: their shims see
#: the exits (and fail to publish them) before it is back.
DOWN_AFTER_EXITS_S = 2.0
#: One ctr call's limit: 20 VMs starting at once on 2 emulated (TCG) cores are slow.
CTR_TIMEOUT_S = 600.0
#: How long a killed task gets to stop, and a deleted container's leftovers to go.
STOP_TIMEOUT_S = 120.0
#: The whole test's limit (pytest-timeout), generous per round.
TEST_TIMEOUT_S = 600 + ROUNDS * max(180, CONTAINERS * 30)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Round:
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each step
    shim_rss_kib: list[int] = field(default_factory=list)
    vmm_rss_kib: list[int] = field(default_factory=list)
    guest_used_kib: list[int] = field(default_factory=list)
    guest_anon_kib: list[int] = field(default_factory=list)
    restored: int = 0  # VMs restored from a template (the others booted cold)

    def measure(self, containerd: Containerd, cid: str, shim: int, guest: dict[str, int]) -> None:
        """Adds one container's figures: its shim's and VMM's, and its guest's meminfo."""
        self.shim_rss_kib.append(rss_kib(shim))
        [vmm] = vm_processes(paths.vm_state_dir(containerd.namespace, cid))
        self.vmm_rss_kib.append(rss_kib(vmm))
        self.restored += b"-incoming" in Path(f"/proc/{vmm}/cmdline").read_bytes()
        self.guest_used_kib.append(guest["MemTotal"] - guest["MemAvailable"])
        self.guest_anon_kib.append(guest["AnonPages"])

    def medians(self) -> dict[str, float]:
        return {
            "shim RSS": statistics.median(self.shim_rss_kib),
            "VMM RSS": statistics.median(self.vmm_rss_kib),
            "guest used": statistics.median(self.guest_used_kib),
            "guest anon": statistics.median(self.guest_anon_kib),
        }


def concurrently(work: Callable[[T], R], items: Iterable[T]) -> list[R]:
    items = list(items)
    with ThreadPoolExecutor(max(1, len(items))) as pool:
        return list(pool.map(work, items))


def ctr(containerd: Containerd, *args: str) -> subprocess.CompletedProcess[str]:
    return containerd.ctr(*args, timeout=CTR_TIMEOUT_S, check=False)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def meminfo_kib(text: str) -> dict[str, int]:
    """The `Name: N kB` lines of /proc/meminfo among other output."""
    fields = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and value.strip().endswith(" kB"):
            fields[name] = int(value.split()[0])
    return fields


class Events:
    """`ctr events` in the background: every /tasks/exit it sees, as (container, process
    id, exit status). Started again after a containerd restart ends it."""

    def __init__(self, containerd: Containerd) -> None:
        self._containerd = containerd
        self._exits: list[tuple[str, str, int]] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        process = subprocess.Popen(
            ctr_command(self._containerd, "events"), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._process = process
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()
        time.sleep(0.5)  # let it subscribe before anything happens

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        # Lines read "<date> <time> <zone> UTC <namespace> /tasks/exit {json}".
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            if " /tasks/exit " not in line:
                continue
            event = json.loads(line.split(" /tasks/exit ", 1)[1])
            status = event.get("exit_status", event.get("exitStatus", 0))
            self._exits.append((event["container_id"], event["id"], int(status)))

    def stop(self) -> list[tuple[str, str, int]]:
        if self._process is not None:
            time.sleep(1.0)  # the last exits are published as their tasks are deleted
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(30)
            self._process = None
        if self._reader is not None:
            self._reader.join(30)
            self._reader = None
        return self._exits

    def __enter__(self) -> Events:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # a no-op once stopped; else no `ctr events` is left running


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_rounds_of_concurrent_containers_deliver_every_exit_and_leak_nothing(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    # A container before the rounds: what only a first container pays for (files read
    # into the page cache, a template built if there was none) is not the first round's.
    warm = ctr(containerd, "run", "--rm", "--runtime", HARPOON, busybox_image, container_id, "true")
    assert warm.returncode == 0, warm.stderr
    rounds: list[Round] = []
    for number in range(ROUNDS):
        started = time.monotonic()
        figures = one_round(
            containerd, busybox_image, f"{container_id}-r{number}", number == RESTART_ROUND
        )
        figures.seconds = time.monotonic() - started
        rounds.append(figures)
        print(
            f"round {number}: {figures.seconds:.0f} s ("
            + ", ".join(f"{k} {v:.0f}" for k, v in figures.phases.items())
            + f"), {figures.restored}/{len(figures.shim_rss_kib)} restored, medians (KiB): "
            + ", ".join(f"{k} {v:.0f}" for k, v in figures.medians().items())
        )
    first, last = rounds[0].medians(), rounds[-1].medians()
    for name, before in first.items():
        after = last[name]
        assert abs(after - before) <= before * RSS_TOLERANCE, (
            f"{name}: median {before:.0f} KiB in the first round, {after:.0f} in the last "
            f"(VMs restored from a template: {rounds[0].restored}, then {rounds[-1].restored})"
        )


def one_round(containerd: Containerd, image: str, stem: str, restart: bool) -> Round:
    ids = [f"{stem}-{n}" for n in range(CONTAINERS)]
    # In the restart round, the first half's inits exit while containerd is down.
    exiting = ids[: len(ids) // 2] if restart else []
    staying = [cid for cid in ids if cid not in exiting]
    init = ("sh", "-c", POLLING_INIT) if restart else ("sleep", "100000")
    figures = Round()
    with Events(containerd) as events:
        mark = time.monotonic()
        failed = concurrently(lambda cid: create(containerd, image, cid, init), ids)
        assert [e for e in failed if e] == [], "ctr run -d failed"
        figures.phases["create"], mark = time.monotonic() - mark, time.monotonic()
        shims = {s.flag("id"): s.pid for s in containerd.shims()}
        assert set(ids) <= set(shims), "a container has no shim"

        if restart:
            events.stop()
            restart_with_exits_while_down(containerd, exiting)
            events.start()
            alive = {s.flag("id"): s.pid for s in containerd.shims()}
            assert {cid: alive.get(cid) for cid in ids} == {cid: shims[cid] for cid in ids}, (
                "a shim did not outlive containerd's restart"
            )
            statuses = task_statuses(containerd)
            assert {cid: statuses.get(cid) for cid in ids} == {
                cid: "STOPPED" if cid in exiting else "RUNNING" for cid in ids
            }
            figures.phases["restart"], mark = time.monotonic() - mark, time.monotonic()

        execs = concurrently(lambda cid: exec_in(containerd, cid), staying)
        figures.phases["exec"] = time.monotonic() - mark
        for cid, (status, out, err) in zip(staying, execs, strict=True):
            assert (status, out.splitlines()[-1:]) == (EXEC_STATUS, [cid]), (
                f"exec in {cid}: status {status}, output {out[-200:]!r}, stderr {err.strip()!r}"
            )
            figures.measure(containerd, cid, shims[cid], meminfo_kib(out))

        mark = time.monotonic()
        failed = concurrently(
            lambda cid: kill_and_delete(
                containerd, cid, DOWNTIME_EXIT_STATUS if cid in exiting else 137,
                kill=cid not in exiting,
            ),
            ids,
        )  # fmt: skip
        assert [e for e in failed if e] == []
        figures.phases["delete"] = time.monotonic() - mark
        exits = events.stop()
    missing = [
        (cid, process, status)
        for cid in staying
        for process, status in ((cid, 137), ("load", EXEC_STATUS))
        if (cid, process, status) not in exits
    ]
    assert missing == [], f"exits not published (container, process, status): {missing}"
    return figures


def create(containerd: Containerd, image: str, cid: str, init: tuple[str, ...]) -> str:
    """`ctr run -d`: returns once the task has started; what went wrong, or ""."""
    result = ctr(containerd, "run", "-d", "--runtime", HARPOON, image, cid, *init)
    return "" if result.returncode == 0 else f"{cid}: {result.stderr.strip()}"


def exec_in(containerd: Containerd, cid: str) -> tuple[int, str, str]:
    """An exec that prints the guest's meminfo and the container's id, and exits 7."""
    script = f"cat /proc/meminfo; echo {cid}; exit {EXEC_STATUS}"
    result = ctr(containerd, "task", "exec", "--exec-id", "load", cid, "sh", "-c", script)
    return result.returncode, result.stdout, result.stderr


def restart_with_exits_while_down(containerd: Containerd, exiting: list[str]) -> None:
    """SIGKILLs containerd, has the `exiting` containers' inits exit while it is down and
    starts it again on the same state."""
    pid = containerd.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while containerd.pid is not None:
            assert time.monotonic() < deadline, "containerd outlived SIGKILL"
            time.sleep(0.05)
        for cid in exiting:
            (rootfs(containerd, cid) / STOP_FILE).touch()
        while not all((rootfs(containerd, cid) / EXITED_FILE).exists() for cid in exiting):
            assert time.monotonic() < deadline, "the inits did not see their stop file"
            time.sleep(0.2)
        time.sleep(DOWN_AFTER_EXITS_S)
    finally:
        # Whatever went wrong, the session's later tests need their containerd back.
        containerd.restart(kill=True)


def kill_and_delete(containerd: Containerd, cid: str, status: int, *, kill: bool) -> str:
    """SIGKILLs the task (if `kill`), deletes it once stopped, checking that the exit
    status is `status`, and the container; what went wrong, or "" when all went well."""
    if kill:
        killed = ctr(containerd, "task", "kill", "--signal", "SIGKILL", cid)
        if killed.returncode != 0:
            return f"{cid}: kill: {killed.stderr.strip()}"
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (deleted := ctr(containerd, "task", "delete", cid)).returncode != 0:
        if time.monotonic() > deadline:
            return f"{cid}: never stopped: {deleted.stderr.strip()}"
        time.sleep(0.2)
    if f"exit code {status}" not in deleted.stdout + deleted.stderr:
        return f"{cid}: delete gave no exit code {status}: {deleted.stderr.strip()}"
    removed = ctr(containerd, "container", "delete", cid)
    if removed.returncode != 0:
        return f"{cid}: container delete: {removed.stderr.strip()}"
    while leftovers(containerd, cid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = leftovers(containerd, cid)
    return f"{cid}: left {left}" if left else ""


def rootfs(containerd: Containerd, cid: str) -> Path:
    """The container's root filesystem as mounted on the host (shared into its VM)."""
    return (
        containerd.state_dir
        / "io.containerd.runtime.v2.task"
        / containerd.namespace
        / cid
        / "rootfs"
    )


def task_statuses(containerd: Containerd) -> dict[str, str]:
    lines = containerd.ctr("task", "ls").stdout.splitlines()[1:]
    return {f[0]: f[-1] for f in (line.split() for line in lines) if f}
