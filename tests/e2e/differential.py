"""Runs one scenario of the differential suite under one runtime and records what ctr shows.

A `Scenario` says what to run (`ctr run` flags, the command, stdin, a terminal or not,
actions while the task lives) and which facts of the result are compared; `run_scenario`
runs it under a runtime on a given containerd and returns an `Outcome`: ctr's exit status,
stdout and stderr (without ctr's own `level=warning` lines) and the facts the actions
recorded. The test module runs each scenario under runc and harpoon and compares facts.

This module never decides what "the same" means for a scenario: the scenario does.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import select
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from harpoon.devenv.containerd import Containerd
from tests.e2e.test_harpoon_io import run_in_terminal
from tests.e2e.test_harpoon_run import ctr_command

RUNC = "io.containerd.runc.v2"
HARPOON = "io.containerd.harpoon.v1"
#: Timeout of one `ctr` invocation that starts a task: it only catches hangs. A harpoon
#: VM boots in ~6-8 s cold; memory-limit-exceeded, while it grew a shell variable, once
#: took 174 s here as the guest reclaimed and re-read busybox's pages (see
#: test_harpoon_run.OOM_COMMAND), against this limit's first value of 180 s.
CTR_RUN_TIMEOUT_S = 600.0
#: How long a task gets to reach RUNNING, to print a marker, or to stop after a kill.
STATE_TIMEOUT_S = 120.0
#: How long a foreground run gets to end once its actions are done (runc: < 1 s).
SETTLE_TIMEOUT_S = 30.0
#: Poll interval while waiting for a task's state.
POLL_INTERVAL_S = 0.1
#: The size of the terminal of `-t` scenarios (rows, columns).
TERMINAL_SIZE = (37, 101)


@dataclass(frozen=True)
class Result:
    """One ctr invocation: its status, stdout and stderr (ctr's warnings dropped)."""

    status: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass(frozen=True)
class Outcome(Result):
    """The scenario's `ctr run` plus the facts its actions recorded."""

    facts: Mapping[str, object] = field(default_factory=dict)


def normalised(output: bytes, container_id: str) -> bytes:
    """ctr's output as comparable across runtimes and runs: without ctr's own log lines
    at warning level (2.3's ctr warns that cgroup v1 is deprecated on every invocation),
    with the timestamps of its other log lines and the container's ID (unless "")
    replaced. nerdctl logs in the same format."""
    lines = [
        line
        for line in output.splitlines(keepends=True)
        if not (line.startswith(b"time=") and b"level=warning" in line)
        # On a terminal ctr logs in colour: "\x1b[33mWARN\x1b[0m[0000] …".
        and not line.startswith(b"\x1b[33mWARN")
    ]
    text = re.sub(rb'^time="[^"]*"', b'time="<time>"', b"".join(lines), flags=re.MULTILINE)
    return text.replace(container_id.encode(), b"<id>") if container_id else text


def digest(data: bytes) -> str:
    """Byte count and SHA-256: what large outputs are compared by."""
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"


@dataclass
class Live:
    """A scenario's task while it exists: what its actions may do to it."""

    containerd: Containerd
    container_id: str
    runtime: str
    #: The foreground `ctr run` (None for detached scenarios).
    process: subprocess.Popen[bytes] | None
    facts: dict[str, object] = field(default_factory=dict)
    #: stdout of the foreground `ctr run` already read by `wait_for_output`.
    consumed: bytearray = field(default_factory=bytearray)

    def ctr(self, *args: str, input: bytes | None = None, raw: bool = False) -> Result:
        """Runs ctr; unless `raw`, its output `normalised` (the container's ID as <id>)."""
        proc = subprocess.run(
            ctr_command(self.containerd, *args), input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, timeout=CTR_RUN_TIMEOUT_S, check=False,
        )  # fmt: skip
        if raw:
            return Result(proc.returncode, proc.stdout, proc.stderr)
        return Result(
            proc.returncode, normalised(proc.stdout, self.container_id),
            normalised(proc.stderr, self.container_id),
        )  # fmt: skip

    def exec(
        self, exec_id: str, *argv: str, flags: tuple[str, ...] = (), input: bytes | None = None
    ) -> Result:
        return self.ctr(
            "task", "exec", "--exec-id", exec_id, *flags, self.container_id, *argv, input=input
        )

    def exec_in_terminal(self, exec_id: str, *argv: str) -> Result:
        status, output = run_in_terminal(
            ctr_command(
                self.containerd, "task", "exec", "-t", "--exec-id", exec_id, self.container_id,
                *argv,
            ),
            *TERMINAL_SIZE, timeout=CTR_RUN_TIMEOUT_S,
        )  # fmt: skip
        return Result(status, terminal_text(output), b"")

    def kill(self, signal: str, *, all: bool = False, exec_id: str | None = None) -> Result:
        args = ["task", "kill", "--signal", signal]
        if all:
            args.append("--all")
        if exec_id is not None:
            args += ["--exec-id", exec_id]
        return self.ctr(*args, self.container_id)

    def status(self) -> str:
        """The task's STATUS column in `ctr task ls` ("" if there is no task)."""
        for line in self.ctr("task", "ls", raw=True).out.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == self.container_id:
                return fields[-1]
        return ""

    def wait_for_status(self, wanted: str) -> None:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while (found := self.status()) != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.runtime}: task never {wanted} (last: {found!r})")
            time.sleep(POLL_INTERVAL_S)

    def wait_for_output(self, marker: bytes) -> None:
        """Reads the foreground run's stdout until `marker` (e.g. a trap is set)."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while marker not in self.consumed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.runtime}: never printed {marker!r}: {self.consumed!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"{self.runtime}: stdout ended before {marker!r}")
                self.consumed += chunk

    def remove(self) -> None:
        """Kills and deletes the task and the container, whatever state they are in."""
        if self.status() not in ("", "STOPPED"):
            self.kill("SIGKILL", all=True)
            self.wait_for_status("STOPPED")
        if self.status():
            self.ctr("task", "delete", self.container_id)
        self.ctr("container", "delete", self.container_id)


Action = Callable[[Live], None]


@dataclass(frozen=True)
class Difference:
    """A fact that is meant to differ between runc and harpoon, and what each must be."""

    reason: str
    #: Whether (runc's value, harpoon's value) is the intended difference.
    holds: Callable[[object, object], bool] = operator.ne


Facts = Callable[[Outcome], Mapping[str, object]]


def status_and_output(outcome: Outcome) -> Mapping[str, object]:
    """The default facts: ctr's status, stdout and stderr, and what the actions recorded."""
    return {"status": outcome.status, "stdout": outcome.out, "stderr": outcome.err,
            **outcome.facts}  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """One row of the table: what to run and which facts of the outcome are compared."""

    name: str
    description: str
    argv: tuple[str, ...]
    #: `ctr run` flags before the image (the runtime, `--rm`/`-d` and `-t` are added).
    flags: tuple[str, ...] = ()
    stdin: bytes | None = None
    #: Run with `ctr run -t` in a pseudo-terminal of TERMINAL_SIZE.
    tty: bool = False
    #: Run with `ctr run -d`; the action does the rest, the task is removed after it.
    detach: bool = False
    #: What to do once the task is RUNNING (or, detached, once `ctr run -d` returned).
    action: Action | None = None
    #: The facts compared, from the outcome.
    facts: Facts = status_and_output
    #: Facts that must differ between runc and harpoon, each with the reason.
    differs: Mapping[str, Difference] = field(default_factory=dict)
    #: containerd flavours the scenario runs on, and why not on the others.
    flavours: tuple[str, ...] = ("1.6", "2.3")
    flavour_reason: str = ""
    #: Why harpoon does not match runc yet (the scenario is a strict xfail).
    xfail: str | None = None
    #: The same, on some flavours only (flavour -> reason).
    xfail_on: Mapping[str, str] = field(default_factory=dict)


def run_scenario(
    containerd: Containerd, image: str, runtime: str, container_id: str, scenario: Scenario
) -> Outcome:
    """Runs the scenario under `runtime` as container `container_id`; leaves nothing."""
    live = Live(containerd, container_id, runtime, process=None)
    mode = ["-d"] if scenario.detach else ["--rm"]
    run_args = [
        "run", *mode, "--runtime", runtime, *scenario.flags, image, container_id, *scenario.argv
    ]  # fmt: skip
    try:
        if scenario.tty:
            assert scenario.action is None and scenario.stdin is None, "tty runs take neither"
            status, output = run_in_terminal(
                ctr_command(containerd, "run", "-t", *run_args[1:]),
                *TERMINAL_SIZE, timeout=CTR_RUN_TIMEOUT_S,
            )  # fmt: skip
            return Outcome(status, normalised(terminal_text(output), container_id), b"")
        if scenario.detach:
            started = live.ctr(*run_args)
            assert started.status == 0, f"{runtime}: ctr run -d failed: {started.err}"
            if scenario.action is not None:
                scenario.action(live)
            return Outcome(0, b"", b"", live.facts)
        if scenario.action is None:
            result = live.ctr(*run_args, input=scenario.stdin)
            return Outcome(result.status, result.stdout, result.stderr)
        return _run_with_action(live, run_args, scenario.action)
    finally:
        if container_id in containerd.containers():
            live.remove()


def _run_with_action(live: Live, run_args: list[str], action: Action) -> Outcome:
    process = subprocess.Popen(
        ctr_command(live.containerd, *run_args), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    live.process = process
    try:
        live.wait_for_status("RUNNING")
        action(live)
        stdout, stderr = process.communicate(timeout=SETTLE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return Outcome(
        process.returncode, normalised(bytes(live.consumed) + stdout, live.container_id),
        normalised(stderr, live.container_id), live.facts,
    )  # fmt: skip


def terminal_text(output: bytes) -> bytes:
    """A terminal's output with the pty's CR-LF line ends back to LF."""
    return output.replace(b"\r\n", b"\n")
