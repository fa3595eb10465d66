"""nerdctl (v2.3.5) on containerd 2.3: its mounts under runc, and harpoon against runc.

Each case is what a user does with nerdctl and host files (`-v DIR:/app`, `-v
FILE:/etc/x:ro`, a named volume, `--tmpfs`), run with `--net none` (no networking yet)
and reduced to facts: nerdctl's status, stdout and stderr and what the host sees
afterwards. Under runc the facts must be the ones written in the case; under harpoon
they must equal runc's, run just before on the same containerd (runc is the oracle).

nerdctl bind-mounts its own /etc/resolv.conf, /etc/hosts and /etc/hostname into every
container: under harpoon they, the `-v` mounts and the volumes all go through the VM's
share (harpoon.sandbox.binds).

nerdctl 2.3 does not support containerd 1.6: there every test is skipped saying so.
Runtime here: ~3 s per nerdctl run under runc (of which the machine's load takes most).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.differential import HARPOON, RUNC, SETTLE_TIMEOUT_S, STATE_TIMEOUT_S, Result
from tests.e2e.nerdctl import Nerdctl, result

Facts = dict[str, object]

#: Poll interval while waiting for a container's write to show on the host.
POLL_INTERVAL_S = 0.1
#: How long the container of `bind_dir` waits for the host's reply (tenths of a second).
REPLY_WAIT_TENTHS = 1200


def outcome(run: Result, prefix: str = "") -> Facts:
    """A run's status, stdout and stderr as facts (named `prefix`…)."""
    return {f"{prefix}status": run.status, f"{prefix}stdout": run.out, f"{prefix}stderr": run.err}


def owner(path: Path) -> tuple[int, int] | None:
    """The uid and gid of a file the container made, None if it is not there."""
    if not path.exists():
        return None
    stat = path.stat()
    return stat.st_uid, stat.st_gid


# -- the cases -------------------------------------------------------------------------


def run_echo(nerdctl: Nerdctl, runtime: str, work: Path) -> Facts:
    return outcome(nerdctl.run(runtime, "--rm", nerdctl.image, "echo", "hi"))


def bind_dir(nerdctl: Nerdctl, runtime: str, work: Path) -> Facts:
    """`-v DIR:/app`: the container reads the host's file; its own write shows on the
    host while it still runs, and the host's reply to it shows in the container."""
    host = work / "app"
    host.mkdir(parents=True, exist_ok=True)
    (host / "from-host.txt").write_text("written on the host\n")
    written, reply = host / "from-container.txt", host / "reply.txt"
    script = (
        "cat /app/from-host.txt && echo written in the container > /app/from-container.txt"
        f" && i=0 && while [ ! -s /app/reply.txt ] && [ $i -lt {REPLY_WAIT_TENTHS} ];"
        " do sleep 0.1; i=$((i+1)); done; cat /app/reply.txt"
    )
    process = nerdctl.start(
        runtime, "--rm", "-v", f"{host}:/app", nerdctl.image, "sh", "-c", script
    )
    seen_while_running = None
    deadline = time.monotonic() + STATE_TIMEOUT_S
    try:
        while process.poll() is None and time.monotonic() < deadline:
            content = written.read_text() if written.exists() else ""
            if content.endswith("\n"):
                seen_while_running = content
                reply.write_text("replied by the host\n")
                break
            time.sleep(POLL_INTERVAL_S)
        stdout, stderr = process.communicate(timeout=STATE_TIMEOUT_S + SETTLE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    run = result(process.returncode, stdout, stderr)
    return {**outcome(run), "seen on the host while it ran": seen_while_running,
            "owner on the host": owner(written)}  # fmt: skip


def bind_file_read_only(nerdctl: Nerdctl, runtime: str, work: Path) -> Facts:
    """`-v FILE:/etc/x:ro`: the container reads the file; a write fails with EROFS."""
    file = work / "x.conf"
    work.mkdir(parents=True, exist_ok=True)
    file.write_text("read-only content\n")
    script = "cat /etc/x; echo changed > /etc/x; echo status=$?"
    run = nerdctl.run(runtime, "--rm", "-v", f"{file}:/etc/x:ro", nerdctl.image, "sh", "-c", script)
    return {**outcome(run), "on the host": file.read_text()}


def named_volume(nerdctl: Nerdctl, runtime: str, work: Path) -> Facts:
    """`-v NAME:/data`: written by one container, which `nerdctl rm` then removes, and
    read by the next; the host sees the file in the volume's directory."""
    volume, writer = "harpoon-test-data", "harpoon-test-writer"
    nerdctl.check("volume", "create", volume)
    try:
        mount = ("-v", f"{volume}:/data")
        first = nerdctl.run(runtime, "--name", writer, *mount, nerdctl.image,
                            "sh", "-c", "echo kept in the volume > /data/file")  # fmt: skip
        nerdctl.check("rm", writer)
        second = nerdctl.run(runtime, "--rm", *mount, nerdctl.image, "cat", "/data/file")
        on_host = nerdctl.volume_path(volume) / "file"
        facts = {**outcome(first, "writer "), **outcome(second, "reader "),
                 "on the host": on_host.read_text() if on_host.exists() else None,
                 "owner on the host": owner(on_host)}  # fmt: skip
    finally:
        nerdctl("rm", "--force", writer)  # gone already, unless the test failed
        nerdctl.check("volume", "rm", volume)
    return facts


def tmpfs(nerdctl: Nerdctl, runtime: str, work: Path) -> Facts:
    """`--tmpfs /scratch`: a writable tmpfs (its default size is half the machine's RAM,
    the VM's under harpoon: not compared; `tmpfs_sized` compares a size)."""
    script = (
        "echo scratch > /scratch/file && cat /scratch/file"
        " && grep ' /scratch ' /proc/mounts | cut -d' ' -f1-4"
        # The guest's kernel (6.1) lists tmpfs's default inode64; newer ones do not.
        " | sed 's/,inode64//'"
    )
    return outcome(
        nerdctl.run(runtime, "--rm", "--tmpfs", "/scratch", nerdctl.image, "sh", "-c", script)
    )


def tmpfs_sized(nerdctl: Nerdctl, runtime: str, work: Path) -> Facts:
    """`--mount type=tmpfs,…,tmpfs-size=16m`: `df` shows that size."""
    mount = "type=tmpfs,destination=/scratch,tmpfs-size=16m"
    return outcome(
        nerdctl.run(runtime, "--rm", "--mount", mount, nerdctl.image, "df", "-k", "/scratch")
    )


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Nerdctl, str, Path], Facts]
    #: What runc gives (the facts the case returns, every one).
    expected: Facts


CASES = [
    Case("run-echo", run_echo, {"status": 0, "stdout": "hi\n", "stderr": ""}),
    Case("bind-dir", bind_dir, {
        "status": 0, "stdout": "written on the host\nreplied by the host\n", "stderr": "",
        "seen on the host while it ran": "written in the container\n",
        "owner on the host": (0, 0),
    }),
    Case("bind-file-read-only", bind_file_read_only, {
        "status": 0, "stdout": "read-only content\nstatus=1\n",
        "stderr": "sh: can't create /etc/x: Read-only file system\n",
        "on the host": "read-only content\n",
    }),
    Case("named-volume", named_volume, {
        "writer status": 0, "writer stdout": "", "writer stderr": "",
        "reader status": 0, "reader stdout": "kept in the volume\n", "reader stderr": "",
        "on the host": "kept in the volume\n", "owner on the host": (0, 0),
    }),
    Case("tmpfs", tmpfs, {
        "status": 0, "stdout": "scratch\ntmpfs /scratch tmpfs rw,nosuid,nodev,noexec,relatime\n",
        "stderr": "",
    }),
    Case("tmpfs-sized", tmpfs_sized, {
        "status": 0, "stderr": "",
        "stdout": "Filesystem           1K-blocks      Used Available Use% Mounted on\n"
                  "tmpfs                    16384         0     16384   0% /scratch\n",
    }),
]  # fmt: skip


def run_case(nerdctl: Nerdctl, case: Case, runtime: str, work: Path) -> Facts:
    """The case's facts under `runtime`, and which containers nerdctl left (none)."""
    facts = case.run(nerdctl, runtime, work)
    return {**facts, "containers left": nerdctl.containers()}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_nerdctl_under_runc(nerdctl: Nerdctl, case: Case, tmp_path: Path) -> None:
    facts = run_case(nerdctl, case, RUNC, tmp_path)
    assert facts == {**case.expected, "containers left": []}


@pytest.mark.vm
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_nerdctl_under_harpoon_matches_runc(nerdctl: Nerdctl, case: Case, tmp_path: Path) -> None:
    runc = run_case(nerdctl, case, RUNC, tmp_path / "runc")
    assert runc == {**case.expected, "containers left": []}, "runc, the oracle, changed"
    assert run_case(nerdctl, case, HARPOON, tmp_path / "harpoon") == runc
