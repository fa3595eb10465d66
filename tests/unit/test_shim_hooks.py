"""The OCI hooks the shim runs on the host (harpoon.shim.hooks), against real hooks:
small scripts and programs run as runc runs them, their processes checked by pid."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from harpoon import aio
from harpoon.errdefs import InvalidArgument, Unknown
from harpoon.shim.hooks import (
    GUEST_PHASES,
    HOST_PHASES,
    MAX_QUOTED_OUTPUT_BYTES,
    STATUS_IN_PHASE,
    Hook,
    HookFailed,
    HookPhase,
    hooks_of,
    run_hooks,
    state_json,
)
from harpoon.ttrpc.status import Code

CREATE_RUNTIME = HookPhase.CREATE_RUNTIME
STATE = state_json("c1", 4242, "/run/bundle", {"nerdctl/name": "web"}, "creating")
# How long a process killed with SIGKILL may take to be gone.
EXIT_WAIT_S = 5.0


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):  # a guard for a hung test, not a step
            await scenario()

    asyncio.run(bounded())


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable shell script; its body may say $OUT for a file beside it."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\nOUT="{tmp_path / name}.out"\n{body}\n')
    path.chmod(0o755)
    return str(path)


def output_of(path: str) -> bytes:
    return Path(f"{path}.out").read_bytes()


def run_phase(hooks: list[Hook], tmp_path: Path, state: bytes = STATE) -> None:
    run(lambda: run_hooks(hooks, state, CREATE_RUNTIME, cwd=tmp_path))


def failure_of(hooks: list[Hook], tmp_path: Path) -> HookFailed:
    with pytest.raises(HookFailed) as failed:
        run_phase(hooks, tmp_path)
    return failed.value


def assert_exits(pid: int) -> None:
    """pid ends (a zombie whose parent is init counts: it no longer runs)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone and reaped already
    try:
        readable, _, _ = select.select([pidfd], [], [], EXIT_WAIT_S)
    finally:
        os.close(pidfd)
    assert readable, f"process {pid} still runs"


def assert_reaped(pid: int) -> None:
    """pid is no zombie of this process's."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# -- what a hook is given ------------------------------------------------------------


def test_a_hook_reads_the_state_json_on_stdin_to_the_byte(tmp_path: Path) -> None:
    hook = script(tmp_path, "hook", 'cat > "$OUT"')
    run_phase([Hook(hook)], tmp_path)
    assert output_of(hook) == STATE
    assert json.loads(STATE) == {
        "ociVersion": "1.3.0",
        "id": "c1",
        "status": "creating",
        "pid": 4242,
        "bundle": "/run/bundle",
        "annotations": {"nerdctl/name": "web"},
    }


def test_a_state_without_pid_or_annotations_leaves_them_out_as_runc_does() -> None:
    state = state_json("c1", None, "/b", {}, STATUS_IN_PHASE[HookPhase.POSTSTOP])
    assert json.loads(state) == {
        "ociVersion": "1.3.0",
        "id": "c1",
        "status": "stopped",
        "bundle": "/b",
    }


def test_the_status_in_each_phase_is_runcs() -> None:
    assert STATUS_IN_PHASE == {
        HookPhase.PRESTART: "creating",
        HookPhase.CREATE_RUNTIME: "creating",
        HookPhase.CREATE_CONTAINER: "creating",
        HookPhase.START_CONTAINER: "created",
        HookPhase.POSTSTART: "running",
        HookPhase.POSTSTOP: "stopped",
    }


def test_a_large_state_reaches_a_hook_that_reads_it_and_does_not_block_one_that_does_not(
    tmp_path: Path,
) -> None:
    # Larger than a pipe holds: written while the hook runs, not before.
    state = state_json("c1", 1, "/b", {"big": "x" * (1 << 20)}, "creating")
    reader = script(tmp_path, "reader", 'cat > "$OUT"')
    ignorer = script(tmp_path, "ignorer", "exit 0")
    run_phase([Hook(reader), Hook(ignorer)], tmp_path, state)
    assert output_of(reader) == state


def test_the_environment_of_a_hook_is_exactly_its_env(tmp_path: Path) -> None:
    hook = script(tmp_path, "hook", 'cat /proc/$$/environ > "$OUT"')
    run_phase([Hook(hook, env=("A=1", "B=two=2", "A=3"))], tmp_path)
    # A name given twice takes its last value, as Go's exec does for runc.
    assert sorted(output_of(hook).split(b"\0")[:-1]) == [b"A=3", b"B=two=2"]


def test_a_hook_without_env_has_the_shims_environment_as_under_runc(tmp_path: Path) -> None:
    hook = script(tmp_path, "hook", 'cat /proc/$$/environ > "$OUT"')
    run_phase([Hook(hook)], tmp_path)
    variables = output_of(hook).split(b"\0")[:-1]
    assert dict(v.split(b"=", 1) for v in variables) == dict(os.environb)


def test_args_are_the_argv_of_the_executed_path_argv0_included(tmp_path: Path) -> None:
    out = tmp_path / "cmdline"
    command = f"cat /proc/$$/cmdline > {out}"
    run_phase([Hook("/bin/sh", args=("not-sh", "-c", command))], tmp_path)
    assert out.read_bytes().split(b"\0")[:-1] == [b"not-sh", b"-c", command.encode()]
    assert Hook("/usr/bin/true").argv == ["/usr/bin/true"]  # no args, as Go's exec


def test_a_hook_runs_in_the_directory_it_is_given(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    hook = script(tmp_path, "hook", 'pwd -P > "$OUT"')
    run(lambda: run_hooks([Hook(hook)], STATE, CREATE_RUNTIME, cwd=bundle))
    assert output_of(hook).decode().strip() == str(bundle.resolve())


# -- a phase's order and its failures ------------------------------------------------


def test_hooks_run_in_order_and_the_first_failure_ends_the_phase_naming_it(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    first = script(tmp_path, "first", f"echo first >> {log}")
    second = script(tmp_path, "second", f"echo second >> {log}; echo said; echo boom >&2; exit 2")
    third = script(tmp_path, "third", f"echo third >> {log}")
    failed = failure_of([Hook(first), Hook(second), Hook(third)], tmp_path)
    assert log.read_text() == "first\nsecond\n"
    assert isinstance(failed, Unknown) and failed.code == Code.UNKNOWN
    assert (failed.phase, failed.index, failed.path) == (CREATE_RUNTIME, 1, second)
    assert failed.message == (
        f"error running createRuntime hook #1: {second}: exit status 2, stdout: said, "
        "stderr: boom: unknown"
    )


def test_a_hook_killed_by_a_signal_says_which(tmp_path: Path) -> None:
    hook = script(tmp_path, "hook", "kill -TERM $$")
    assert "killed by signal SIGTERM" in failure_of([Hook(hook)], tmp_path).message


def test_the_output_a_failure_quotes_is_its_end_and_bounded(tmp_path: Path) -> None:
    body = "head -c 1000000 /dev/zero | tr '\\0' x >&2; echo the end >&2; exit 1"
    message = failure_of([Hook(script(tmp_path, "hook", body))], tmp_path).message
    assert message.endswith("xxxthe end: unknown")
    written = 1_000_000 + len("the end\n")
    assert f"[{written - MAX_QUOTED_OUTPUT_BYTES} bytes before] xxx" in message
    assert len(message) < MAX_QUOTED_OUTPUT_BYTES + 250 + len(str(tmp_path))


def test_a_missing_or_not_executable_hook_fails_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    failed = failure_of([Hook(missing)], tmp_path)
    assert failed.message.startswith(f"error running createRuntime hook #0: {missing}: ")
    assert "No such file or directory" in failed.message
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(stat.S_IRUSR | stat.S_IWUSR)
    failed = failure_of([Hook(str(plain))], tmp_path)
    assert f"{plain}: cannot execute it: Permission denied" in failed.message


# -- nothing outlives a hook that timed out or was cancelled -------------------------


def test_a_hook_out_of_time_is_killed_with_its_children_and_reaped(tmp_path: Path) -> None:
    hook = script(tmp_path, "hook", 'sleep 100 & echo "$$ $!" > "$OUT"; echo waiting; wait')
    failed = failure_of([Hook(hook, timeout_s=1)], tmp_path)
    assert failed.message == (
        f"error running createRuntime hook #0: {hook}: hook ran past specified timeout of "
        "1.0s, stdout: waiting, stderr: : unknown"
    )
    hook_pid, child_pid = map(int, output_of(hook).split())
    assert_reaped(hook_pid)
    assert_exits(hook_pid)
    assert_exits(child_pid)


def test_a_cancelled_run_kills_the_hook_and_its_children_and_leaves_no_descriptor(
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    os.mkfifo(started)
    hook = script(tmp_path, "hook", f'sleep 100 & echo "$$ $!" > {started}; wait')

    async def scenario() -> None:
        fds_before = sorted(os.listdir("/proc/self/fd"))
        # Read-write: the FIFO has a writer, so a read waits for the hook's line.
        fifo = os.open(started, os.O_RDWR | os.O_NONBLOCK)
        try:
            running = asyncio.create_task(run_hooks([Hook(hook)], STATE, CREATE_RUNTIME, cwd="/"))
            hook_pid, child_pid = map(int, (await aio.read_some(fifo)).split())
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
        finally:
            os.close(fifo)
        assert_reaped(hook_pid)
        assert_exits(hook_pid)
        assert_exits(child_pid)
        assert sorted(os.listdir("/proc/self/fd")) == fds_before

    run(scenario)


def test_a_child_left_holding_the_output_is_neither_waited_for_nor_killed(
    tmp_path: Path,
) -> None:
    # Under runc the hook's call would wait for the child (Go's Wait reads to EOF).
    hook = script(tmp_path, "hook", 'sleep 100 & echo $! > "$OUT"')
    run_phase([Hook(hook)], tmp_path)
    child_pid = int(output_of(hook))
    try:
        assert Path(f"/proc/{child_pid}/stat").read_text().split()[2] in "RS"
    finally:
        os.kill(child_pid, signal.SIGKILL)


# -- the spec's hooks, checked -------------------------------------------------------


def test_hooks_of_reads_a_phases_hooks_in_order() -> None:
    spec = {
        "hooks": {
            "createRuntime": [
                {"path": "/usr/bin/nerdctl", "args": ["nerdctl", "internal", "oci-hook",
                 "createRuntime"], "env": ["PATH=/usr/bin"], "timeout": 30},
                {"path": "/bin/true"},
            ],
            "poststop": [{"path": "/bin/false", "env": []}],
        }
    }  # fmt: skip
    assert hooks_of(spec, CREATE_RUNTIME) == [
        Hook(
            "/usr/bin/nerdctl",
            ("nerdctl", "internal", "oci-hook", "createRuntime"),
            ("PATH=/usr/bin",),
            30,
        ),
        Hook("/bin/true"),
    ]
    assert hooks_of(spec, HookPhase.POSTSTOP) == [Hook("/bin/false", env=())]
    assert hooks_of(spec, HookPhase.PRESTART) == []
    assert hooks_of({}, CREATE_RUNTIME) == []


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"path": "bin/hook"}, "hooks.createRuntime[1].path: 'bin/hook' is not absolute"),
        ({"args": ["x"]}, "hooks.createRuntime[1].path: a path is required"),
        ({"path": "/h", "timeout": 0}, "hooks.createRuntime[1].timeout: 0 is not"),
        ({"path": "/h", "timeout": -1}, "hooks.createRuntime[1].timeout: -1 is not"),
        ({"path": "/h", "timeout": 1.5}, "hooks.createRuntime[1].timeout: 1.5 is not"),
        ({"path": "/h", "timeout": True}, "hooks.createRuntime[1].timeout: True is not"),
        ({"path": "/h", "args": "x"}, "hooks.createRuntime[1].args: a list of strings"),
        ({"path": "/h", "args": ["x", 1]}, "hooks.createRuntime[1].args: a list of strings"),
        ({"path": "/h", "env": ["PATH"]}, "hooks.createRuntime[1].env: 'PATH' is not NAME="),
        ({"path": "/h", "env": ["=x"]}, "hooks.createRuntime[1].env: '=x' is not NAME="),
        ({"path": "/h", "args": ["a\0b"]}, "hooks.createRuntime[1]: 'a\\x00b' holds a NUL"),
        ("/h", "hooks.createRuntime[1]: an object was expected"),
    ],
    ids=str,
)
def test_a_hook_the_runtime_spec_does_not_allow_is_refused_naming_where(
    entry: Any, complaint: str
) -> None:
    spec = {"hooks": {"createRuntime": [{"path": "/bin/true"}, entry]}}
    with pytest.raises(InvalidArgument) as refused:
        hooks_of(spec, CREATE_RUNTIME)
    assert refused.value.message.startswith(complaint)


def test_hooks_that_are_not_a_list_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"hooks\.poststop: a list was expected"):
        hooks_of({"hooks": {"poststop": {"path": "/bin/true"}}}, HookPhase.POSTSTOP)


def test_the_container_namespace_phases_are_never_run_on_the_host(tmp_path: Path) -> None:
    assert {HookPhase.CREATE_CONTAINER, HookPhase.START_CONTAINER} == GUEST_PHASES
    assert set(HookPhase) == HOST_PHASES | GUEST_PHASES
    hook = script(tmp_path, "hook", 'touch "$OUT"')
    for phase in GUEST_PHASES:
        with pytest.raises(ValueError, match="container's namespaces"):
            run(lambda: run_hooks([Hook(hook)], STATE, phase, cwd=tmp_path))  # noqa: B023
    assert not Path(f"{hook}.out").exists()
