"""`python bench/breakdown.py`: where the time of one `ctr run --rm … echo hi` goes.

Runs harpoon containers from a VM template (with --cold: booted cold, templates off) in a
throw-away containerd (debug log) and
lines up, per run, containerd's own log lines (`creating task`, `connecting to shim`,
`shim disconnected`, …) with the shim's debug lines (`start process: main at …`, `QEMU
… launched`, `call Create received`, `agent CreateProcess answered in …`, `restore of
…`). Prints, per event, the median over the runs of its time since `ctr` started, and
the step from the row before.

With --strace, `strace -f` is also attached to containerd (process, mount, kill and
connect syscalls only, filtered by seccomp), which shows every process's exec and exit
but slows process creation a lot: use it for the order of events, not for their times.

    python bench/breakdown.py --runs 10
    python bench/breakdown.py --runs 10 --cold
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/breakdown.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import compile_harpoon
from bench.template import ensure_template
from harpoon.devenv.containerd import Containerd
from harpoon.devenv.images import build_busybox_image, default_cache_dir
from harpoon.devenv.tools import scripts_dir
from harpoon.guest import find_guest
from harpoon.sandbox.template import TEMPLATES_ENV

RUNTIME = "io.containerd.harpoon.v1"
TRACED = "execve,exit_group,kill,mount,umount2,connect,clone,clone3,vfork"
STRACE_ATTACH_S = 0.5

_SYSCALL = re.compile(r"^(\d+)\s+([0-9.]+)\s+(\w+)\((.*)$")
_SHIM_LINE = re.compile(
    r"^time=(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) level=\w+ msg=(.*?) runtime=harpoon"
)


@dataclass
class Run:
    t0: float
    t1: float
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, when: float) -> None:
        self.marks.setdefault(name, when - self.t0)


def _shim_lines(log: Path, t0: float, t1: float) -> list[tuple[float, str]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        match = _SHIM_LINE.match(line)
        if not match:
            continue
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
        when = time.mktime(stamp.timetuple()) + int(match.group(2)) / 1e3
        if t0 - 0.01 <= when <= t1 + 1.0:
            lines.append((when, match.group(3)))
    return lines


_CONTAINERD_LINE = re.compile(
    r'^time="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z" \S+ msg="([^"]*)"'
)
_CONTAINERD_MARKS = {
    "creating task": "containerd: creating task (runs shim start)",
    "connecting to shim": "containerd: start answered, connecting",
    "shim disconnected": "containerd: shim disconnected",
    "cleaning up dead shim": "containerd: runs shim delete",
    "remove snapshot": "containerd: shim delete done (removes the snapshot)",
}
_RESTORE = re.compile(r"launch (\d+) ms, connect \+ migrate-incoming (\d+) ms, Hello (\d+) ms")
COLD_HELLO = "agent Hello answered (cold boot: agent ready)"
_START = re.compile(r"start process: main at ([0-9.]+), forked at ([0-9.]+)")


def _containerd_lines(log: Path, t0: float, t1: float) -> list[tuple[float, str]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        match = _CONTAINERD_LINE.match(line)
        if not match:
            continue
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
        when = calendar.timegm(stamp.timetuple()) + float(match.group(2) or 0)
        if t0 - 0.01 <= when <= t1 + 1.0:
            lines.append((when, match.group(3)))
    return lines


def analyse_logs(run: Run, log: Path) -> None:
    """Marks from containerd's own lines and the shim's debug lines (no strace)."""
    for when, message in _containerd_lines(log, run.t0, run.t1):
        for prefix, name in _CONTAINERD_MARKS.items():
            if message.startswith(prefix):
                run.mark(name, when)
    agent_answers: dict[str, int] = {}
    for when, message in _shim_lines(log, run.t0, run.t1):
        _mark_shim_line(run, when, message, agent_answers)
    # The agent's Hello line comes before the restore's own: only a cold boot's counts.
    if "restore: Hello answered" in run.marks:
        run.marks.pop(COLD_HELLO, None)


def _mark_shim_line(run: Run, when: float, message: str, agent_answers: dict[str, int]) -> None:
    """The mark of one of the shim's debug lines, if it makes one; `agent_answers` counts
    each agent method's answers so far (the second CreateProcess is `… #2`)."""
    if message.startswith("start process:"):
        match = _START.search(message)
        if match:
            run.mark("shim start: main()", float(match.group(1)))
            run.mark("shim start: daemon forked", float(match.group(2)))
    elif message.startswith("QEMU ") and " launched " in message:
        run.mark("QEMU launched", when)
    elif message.startswith("serving "):
        run.mark("daemon: serving", when)
    elif message.startswith("call "):
        words = message.split()
        run.mark(f"{words[1]} {words[2]}", when)
    elif message.startswith("created ") and (" started in " in message or " booted in " in message):
        run.mark("Create: VM booted, Hello answered", when)
    elif message.startswith("restore of"):
        _mark_restore(run, when, message)
    elif message.startswith("agent "):
        _mark_agent_answer(run, when, message.split()[1], agent_answers)


def _mark_restore(run: Run, when: float, message: str) -> None:
    """A restore's line, and the steps its timings put before it."""
    run.mark("restore: Hello answered", when)
    match = _RESTORE.search(message)
    if match:
        connect, hello = int(match.group(2)) / 1e3, int(match.group(3)) / 1e3
        run.mark("restore: QEMU's sockets up", when - hello - connect)
        run.mark("restore: migrate-incoming sent", when - hello)


def _mark_agent_answer(run: Run, when: float, method: str, answers: dict[str, int]) -> None:
    if method == "Hello":
        run.mark(COLD_HELLO, when)
        return
    answers[method] = answers.get(method, 0) + 1
    suffix = f" #{answers[method]}" if answers[method] > 1 else ""
    run.mark(f"agent {method}{suffix} answered", when)


@dataclass
class _TracedPids:
    """The processes a trace's lines are told apart by, as their execs and forks show."""

    start: int | None = None
    daemon: int | None = None
    qemu: int | None = None
    cat: int | None = None
    delete: int | None = None


def analyse(trace: Path, log: Path, t0: float, t1: float) -> Run:
    run = Run(t0, t1)
    if not trace.exists():
        analyse_logs(run, log)
        run.marks["ctr: exit"] = t1 - t0
        return run
    pids = _TracedPids()
    for line in trace.read_text(errors="replace").splitlines():
        match = _SYSCALL.match(line)
        if match:
            pid, when = int(match.group(1)), float(match.group(2))
            _mark_syscall(run, pids, pid, when, match.group(3), match.group(4))
    for when, message in _shim_lines(log, t0, t1):
        _mark_traced_shim_line(run, when, message)
    run.marks["ctr: exit"] = t1 - t0
    return run


def _mark_syscall(run: Run, pids: _TracedPids, pid: int, when: float, call: str, rest: str) -> None:
    """The mark of one traced syscall (`rest`: its arguments and result), if it makes one."""
    if call == "execve":
        _mark_execve(run, pids, pid, when, rest)
    elif call in ("clone", "clone3", "vfork") and pid == pids.start and "= " in rest:
        child = rest.rsplit("= ", 1)[1].split()[0]
        if child.isdigit():
            run.mark("daemon: forked", when)
            pids.daemon = pids.daemon or int(child)
    elif call == "mount" and "overlay" in rest:
        run.mark("rootfs mounted", when)
    elif call == "connect" and "agent.sock" in rest:
        run.mark("agent socket connected", when)
    elif call == "connect" and "vmm.sock" in rest:
        run.mark("QMP connected", when)
    elif call == "kill" and pids.qemu is not None and rest.startswith(f"{pids.qemu},"):
        run.mark("qemu: killed", when)
    elif call == "umount2":
        run.mark("rootfs unmounted", when)
    elif call == "exit_group":
        _mark_exit(run, pids, pid, when)


def _mark_execve(run: Run, pids: _TracedPids, pid: int, when: float, rest: str) -> None:
    shim = "containerd-shim-harpoon-v1" in rest
    if shim and '"start"]' in rest:
        pids.start = pid
        run.mark("shim start: exec", when)
    elif shim and '"delete"]' in rest:
        pids.delete = pid
        run.mark("shim delete: exec", when)
    elif shim and pid != pids.start:
        pids.daemon = pid
        run.mark("daemon: exec", when)
    elif "qemu-system" in rest and '"help"]' in rest:
        run.mark("qemu -M help: exec", when)
    elif "qemu-system" in rest:
        pids.qemu = pid
        run.mark("qemu: exec", when)
    elif '"cat", "' in rest:
        pids.cat = pid
        run.mark("state load: cat exec", when)


def _mark_exit(run: Run, pids: _TracedPids, pid: int, when: float) -> None:
    exits = (
        (pids.start, "shim start: exit"),
        (pids.daemon, "daemon: exit"),
        (pids.qemu, "qemu: exit"),
        (pids.cat, "state load: cat exit"),
        (pids.delete, "shim delete: exit"),
    )
    for process, mark in exits:  # the first that matches names the process
        if pid == process:
            run.mark(mark, when)
            return


def _mark_traced_shim_line(run: Run, when: float, message: str) -> None:
    """The shim's lines that a trace does not show."""
    if message.startswith("serving "):
        run.mark("daemon: serving", when)
    elif message.startswith("call "):
        words = message.split()
        run.mark(f"{words[1]} {words[2]}", when)
    elif message.startswith("restore of"):
        run.mark("restore: Hello answered", when)
    elif message.startswith("agent "):
        words = message.split()
        if words[1] != "Hello":
            run.mark(f"agent {words[1]} answered", when)


def _strace(pid: int, output: Path) -> subprocess.Popen[bytes]:
    argv = ["strace", "-f", "-ttt", "-qq", "-s", "300", "--seccomp-bpf", "-e", f"trace={TRACED}"]
    return subprocess.Popen([*argv, "-o", str(output), "-p", str(pid)], stderr=subprocess.DEVNULL)


def _ensure_template(daemon: Containerd, image: str) -> None:
    """One warm-up run; if it booted cold, waits for the template its shim's background
    builder makes (or builds it)."""
    result = daemon.ctr("run", "--rm", "--runtime", RUNTIME, image, "bd-warm", "echo", "hi",
                        check=False, timeout=300)  # fmt: skip
    print(f"warm-up: exit {result.returncode} {result.stdout!r}", file=sys.stderr)
    if "restored bd-warm" not in daemon.log_path.read_text(errors="replace"):
        print(f"warm-up: {asyncio.run(ensure_template(find_guest()))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/breakdown.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--containerd", default="2.3")
    parser.add_argument("--keep", type=Path, help="keep traces and the log in this directory")
    parser.add_argument(
        "--strace", action="store_true",
        help="also trace containerd's children (exact process events, but slower runs)",
    )  # fmt: skip
    parser.add_argument(
        "--cold",
        action="store_true",
        help=f"boot every VM cold ({TEMPLATES_ENV}=off for the shims)",
    )
    args = parser.parse_args(argv)
    if args.cold:
        os.environ[TEMPLATES_ENV] = "off"  # containerd passes it on to the shims
    compile_harpoon()  # measured as installed: see bench.machine.compile_harpoon
    runs = _measure(args)
    if not runs:
        print(f"no run {'booted cold' if args.cold else 'restored from a template'}",
              file=sys.stderr)  # fmt: skip
        return 1
    _print_table(runs)
    return 0


def _measure(args: argparse.Namespace) -> list[Run]:
    """The runs that started as asked (restored, or with --cold booted cold)."""
    runs: list[Run] = []
    with Containerd(args.containerd, path_prepend=[scripts_dir()], log_level="debug") as daemon:
        work = args.keep or daemon.paths.base / "breakdown"
        work.mkdir(parents=True, exist_ok=True)
        image = daemon.import_image(build_busybox_image(default_cache_dir()))
        if not args.cold:
            _ensure_template(daemon, image)
        for i in range(args.runs):
            run = _run_once(daemon, image, i, work / f"trace-{i}.txt", args.strace)
            if run is None:
                continue
            restored = "restore: Hello answered" in run.marks
            wanted = restored != args.cold
            note = "" if wanted else " (restored)" if restored else " (NOT restored)"
            print(f"run {i}: {run.t1 - run.t0:.3f} s{note}", file=sys.stderr)
            if wanted:
                runs.append(run)
        if args.keep:
            (work / "containerd.log").write_bytes(daemon.log_path.read_bytes())
    return runs


def _run_once(daemon: Containerd, image: str, i: int, trace: Path, strace: bool) -> Run | None:
    """One `ctr run --rm … echo hi`, analysed; None if it failed."""
    assert daemon.pid is not None
    tracer = _strace(daemon.pid, trace) if strace else None
    time.sleep(STRACE_ATTACH_S)
    argv = [str(daemon.flavour.ctr), "--address", daemon.address, "--namespace",
            daemon.namespace, "run", "--rm", "--runtime", RUNTIME, image, f"bd-{i}",
            "echo", "hi"]  # fmt: skip
    t0 = time.time()
    result = subprocess.run(argv, capture_output=True, env=daemon._environment(),
                            check=False, timeout=300)  # fmt: skip
    t1 = time.time()
    time.sleep(0.3)
    if tracer is not None:
        _stop_strace(tracer)
    if result.returncode != 0 or result.stdout != b"hi\n":
        print(f"run {i}: failed: {result.returncode} {result.stderr!r}", file=sys.stderr)
        return None
    time.sleep(0.2)  # the shim's last lines reach containerd's log
    return analyse(trace, daemon.log_path, t0, t1)


def _stop_strace(tracer: subprocess.Popen[bytes]) -> None:
    tracer.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        tracer.wait(5)
    if tracer.poll() is None:
        tracer.kill()
        tracer.wait()


def _print_table(runs: list[Run]) -> None:
    names: dict[str, list[float]] = {}
    for run in runs:
        for name, value in run.marks.items():
            names.setdefault(name, []).append(value)
    order = sorted(names, key=lambda n: statistics.median(names[n]))
    print(f"| event (ms from ctr start, median of {len(runs)}) | median | min | max | n |")
    print("|---|---:|---:|---:|---:|")
    previous = 0.0
    for name in order:
        values = names[name]
        median = statistics.median(values) * 1e3
        print(f"| {name} | {median:.0f} (+{median - previous:.0f}) | {min(values) * 1e3:.0f} | "
              f"{max(values) * 1e3:.0f} | {len(values)} |")  # fmt: skip
        previous = median


if __name__ == "__main__":
    sys.exit(main())
