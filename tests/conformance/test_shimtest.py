"""containerd's shim conformance suite, containerd/shimtest, against harpoon's shim and,
as the baseline beside it, containerd 2.3's runc shim: one pytest result per case.

Each runtime's profile (`shimtest-<runtime>.json` here: shimtest's keys, and ours under
`"harpoon"`, see harpoon.devenv.shimtest) runs once per session, with `-test.short`
(no Stress: it runs until the binary's deadline) and `-test.v`, in a private workspace.
Then every case of the profile's suites is a test here: a pass passes; a failure fails
with shimtest's output for that case; a case the profile skips is skipped with the
profile's reason, and one it expects to fail is an xfail with that reason (and fails
once it passes: the entry must go). The run leaves nothing behind (harpoon's check:
shimtest's own looks for shims by executable and cannot see a Python one), or only what
the profile's `known_failures` says.

Needs root, the tools scripts/install-deps builds and, for harpoon, the guest image.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harpoon.devenv.shimtest import (
    LEFTOVERS,
    STRESS_CASE,
    CaseResult,
    Leftover,
    Profile,
    Report,
    Workspace,
    command,
    parse,
)
from harpoon.devenv.tools import SHIMTEST, flavour, installed_shim
from tests.prerequisites import unavailable

PROFILE_DIR = Path(__file__).resolve().parent
#: harpoon with its 9p rootfs, harpoon with the rootfs as erofs layers (format_mounts:
#: the layers suite), and the runc baseline.
RUNTIMES = ("harpoon", "harpoon-erofs", "runc")
#: shimtest's own deadline: it then fails with a goroutine dump rather than hang.
SHIMTEST_TIMEOUT_S = 420
#: Ours, past shimtest's (one run of harpoon's profile takes ~70 s here).
RUN_TIMEOUT_S = SHIMTEST_TIMEOUT_S + 60
#: How long a shim may take to exit after shimtest has finished with it.
SHIM_EXIT_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.2
#: The most of a case's output a failure shows (the whole run goes to HARPOON_LOG_DIR).
FAILURE_OUTPUT_LINES = 80
#: shimtest's own leak check's words, on its profile-level test.
SHIMTEST_LEAK_REPORT = "leaked shim process"


def profile(runtime: str) -> Profile:
    return Profile.load(PROFILE_DIR / f"shimtest-{runtime}.json")


def shim_binary(runtime: str) -> Path:
    """The shim under test: this checkout's harpoon, or containerd 2.3's runc shim (1.6's
    cannot run shimtest: it does not speak 2.3's bootstrap protocol at `start`)."""
    if runtime.startswith("harpoon"):
        shim = installed_shim()
        if shim is None:
            unavailable("containerd-shim-harpoon-v1 is not installed: run scripts/install-deps")
        assert shim is not None
        return shim
    runc = flavour("2.3")
    if runc.missing_binaries():
        unavailable(f"containerd {runc.version}'s runc shim is missing: {runc.install_hint()}")
    return runc.binary("containerd-shim-runc-v2")


@dataclass
class Run:
    """One runtime's shimtest run: its cases, what it left, how it went."""

    report: Report
    leftovers: list[Leftover]
    seconds: float
    status: str
    tail: str


def run_shimtest(runtime: str) -> Run:
    if os.geteuid() != 0:
        unavailable("shimtest needs root: the shims mount rootfs and run containers")
    if SHIMTEST.missing_binaries():
        unavailable(f"shimtest is not built: {SHIMTEST.install_hint()}")
    chosen = profile(runtime)
    argv, env = command(
        chosen,
        shim_binary(runtime),
        ["-test.v", "-test.short", f"-test.timeout={SHIMTEST_TIMEOUT_S}s", *chosen.test_flags()],
    )
    workspace = Workspace()
    env.update(workspace.environment())
    started = time.monotonic()
    try:
        try:
            done = subprocess.run(
                argv, env=env, cwd=workspace.root, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=RUN_TIMEOUT_S, check=False,
            )  # fmt: skip
            output, status = done.stdout, f"exit status {done.returncode}"
        except subprocess.TimeoutExpired as timeout:
            output = timeout.output if isinstance(timeout.output, str) else ""
            status = f"killed after {RUN_TIMEOUT_S} s"
        seconds = time.monotonic() - started
        leftovers = settled_leftovers(workspace)
    finally:
        workspace.clean_up()
    keep_log(runtime, output)
    tail = "\n".join(output.splitlines()[-30:])
    return Run(parse(output, chosen.name), leftovers, seconds, status, tail)


def settled_leftovers(workspace: Workspace) -> list[Leftover]:
    """The workspace's leftovers once exiting shims have had their time to exit."""
    deadline = time.monotonic() + SHIM_EXIT_TIMEOUT_S
    leftovers = workspace.leftovers()
    while leftovers and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        leftovers = workspace.leftovers()
    return leftovers


def keep_log(runtime: str, output: str) -> None:
    log_dir = os.environ.get("HARPOON_LOG_DIR")
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / f"shimtest-{runtime}.log").write_text(output)


class Runs:
    """Each runtime's run, made when a test first asks for it (once per session): a run
    that could not be made (a skip, a failure, an error) is not tried again either."""

    def __init__(self) -> None:
        self._runs: dict[str, Run | BaseException] = {}

    def of(self, runtime: str) -> Run:
        if runtime not in self._runs:
            try:
                self._runs[runtime] = run_shimtest(runtime)
            except (Exception, pytest.skip.Exception, pytest.fail.Exception) as error:
                self._runs[runtime] = error
        outcome = self._runs[runtime]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture(scope="session")
def shimtest_runs() -> Runs:
    return Runs()


def _params(runtime: str, *values: str) -> Any:
    # harpoon's cases boot VMs.
    marks = [pytest.mark.vm] if runtime.startswith("harpoon") else []
    return pytest.param(runtime, *values, marks=marks, id="-".join((runtime, *values)))


CASES = [_params(runtime, case) for runtime in RUNTIMES for case in profile(runtime).cases()]


def failure_text(runtime: str, case: str, result: CaseResult) -> str:
    subtests = f" (subtests {', '.join(result.failed_subtests)})" if result.failed_subtests else ""
    lines = result.output[-FAILURE_OUTPUT_LINES:]
    return f"shimtest {runtime}: {case} failed{subtests}:\n" + "\n".join(lines)


def known_failure_is_gone(chosen: Profile, key: str, now: str) -> None:
    """Fails for an expected failure that did not happen: the profile's entry must go."""
    pytest.fail(
        f"{now}: remove {key!r} from known_failures in {chosen.path.name} "
        f"(it said: {chosen.known_failures[key]})",
        pytrace=False,
    )


@pytest.mark.parametrize(("runtime", "case"), CASES)
def test_shimtest_case(shimtest_runs: Runs, runtime: str, case: str) -> None:
    chosen = profile(runtime)
    if case in chosen.skipped_cases:
        pytest.skip(chosen.skipped_cases[case])
    run = shimtest_runs.of(runtime)
    result = run.report.cases.get(case)
    if result is None:
        pytest.fail(
            f"shimtest {runtime} reported nothing for {case} ({run.status} after "
            f"{run.seconds:.0f} s); its output ended:\n{run.tail}",
            pytrace=False,
        )
    assert result is not None
    expected_failure = chosen.known_failures.get(case)
    if result.verdict == "SKIP":
        unavailable(f"shimtest skipped it: {' '.join(' '.join(result.output).split())}")
    elif result.verdict == "FAIL" and expected_failure is None:
        pytest.fail(failure_text(runtime, case, result), pytrace=False)
    elif result.verdict == "FAIL":
        pytest.xfail(expected_failure)
    elif expected_failure is not None:
        known_failure_is_gone(chosen, case, f"{case} passes now")


@pytest.mark.parametrize("runtime", [_params(r) for r in RUNTIMES])
def test_shimtest_run_leaves_nothing_behind(shimtest_runs: Runs, runtime: str) -> None:
    """Nothing the run started or made outlives it: no process naming its workspace, no
    mount, no file, no VM state or share directory; or, where the profile expects it,
    shim daemons and nothing else. shimtest's own word on the run counts too."""
    chosen = profile(runtime)
    run = shimtest_runs.of(runtime)
    own_failures = [
        line.strip()
        for line in run.report.own_output
        if line.strip() and SHIMTEST_LEAK_REPORT not in line and run.report.verdict == "FAIL"
    ]
    assert own_failures == [], f"shimtest's checks of the whole {runtime} run failed"
    expected = chosen.known_failures.get(LEFTOVERS)
    unexpected = [
        str(leftover)
        for leftover in run.leftovers
        if expected is None or leftover.kind != "shim daemon"
    ]
    assert unexpected == [], f"the shimtest run of {runtime} left these behind"
    if expected is not None and run.leftovers:
        pytest.xfail(f"left {len(run.leftovers)} shim daemons: {expected}")
    if expected is not None:
        known_failure_is_gone(chosen, LEFTOVERS, "the run left nothing")


@pytest.mark.parametrize("runtime", [_params(r) for r in RUNTIMES])
def test_shimtest_ran_exactly_the_profiles_cases(shimtest_runs: Runs, runtime: str) -> None:
    """A case shimtest ran that the profile's suites do not list (a newer shimtest) would
    pass unseen, and one it did not run would not be tested: both fail here."""
    run = shimtest_runs.of(runtime)
    assert set(run.report.cases) == profile(runtime).expected_cases(), run.tail
    assert run.report.cases[STRESS_CASE].verdict == "SKIP"
