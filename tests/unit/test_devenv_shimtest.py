"""The pure parts of the shimtest harness: profiles and `-test.v` output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harpoon.devenv.shimtest import Profile, ProfileError, Workspace, parse

CONFORMANCE = Path(__file__).resolve().parents[1] / "conformance"

# Trimmed from a real run (runc, 2026-12-06): a passing case, one with subtests of which
# one fails, and shimtest's own leak check reporting on the profile's test.
OUTPUT = """\
=== RUN   TestShim
=== RUN   TestShim/runc
=== RUN   TestShim/runc/Lifecycle
    run_suite.go:68: shim binary: /x/containerd-shim-runc-v2
=== RUN   TestShim/runc/InitExitCodes
=== RUN   TestShim/runc/InitExitCodes/Exit0
=== RUN   TestShim/runc/InitExitCodes/Exit42
    run_suite.go:240: exit status: got 1, want 42
=== RUN   TestShim/runc/Stress
    stress_suite.go:97: skipping stress test in short mode
=== NAME  TestShim/runc
    helpers.go:118: leaked shim process: PID 19384 (namespace=shimtest-run-bb id=x)
--- FAIL: TestShim (4.11s)
    --- FAIL: TestShim/runc (4.11s)
        --- PASS: TestShim/runc/Lifecycle (0.50s)
        --- FAIL: TestShim/runc/InitExitCodes (2.37s)
            --- PASS: TestShim/runc/InitExitCodes/Exit0 (0.37s)
            --- FAIL: TestShim/runc/InitExitCodes/Exit42 (0.40s)
        --- SKIP: TestShim/runc/Stress (0.00s)
FAIL
"""


def test_each_case_gets_its_verdict_and_output_with_its_subtests_folded_in() -> None:
    report = parse(OUTPUT, "runc")
    assert sorted(report.cases) == ["InitExitCodes", "Lifecycle", "Stress"]
    assert report.cases["Lifecycle"].verdict == "PASS"
    assert report.cases["Lifecycle"].seconds == 0.5
    failed = report.cases["InitExitCodes"]
    assert (failed.verdict, failed.failed_subtests) == ("FAIL", ["Exit42"])
    assert failed.output == ["    run_suite.go:240: exit status: got 1, want 42"]
    assert report.cases["Stress"].verdict == "SKIP"


def test_the_profiles_own_output_is_shimtests_word_on_the_run_and_nothing_after_it() -> None:
    report = parse(OUTPUT, "runc")
    assert report.verdict == "FAIL"
    assert report.own_output == [
        "    helpers.go:118: leaked shim process: PID 19384 (namespace=shimtest-run-bb id=x)"
    ]


def test_a_run_cut_short_reports_only_the_cases_that_finished() -> None:
    cut = OUTPUT.split("--- FAIL: TestShim (")[0] + "panic: test timed out after 7m0s\n"
    assert parse(cut, "runc").cases == {}


def write_profile(tmp_path: Path, **fields: Any) -> Path:
    path = tmp_path / "shimtest-x.json"
    path.write_text(json.dumps({"shim_binary": "containerd-shim-x-v1", **fields}))
    return path


def test_a_skipped_case_is_left_out_with_test_skip_and_a_feature_by_shimtest() -> None:
    profile = Profile.load(CONFORMANCE / "shimtest-harpoon.json")
    run, skip = profile.test_flags()[1], profile.test_flags()[3]
    assert run == "^TestShim$"
    assert skip.startswith("^TestShim$/^shimtest\\-harpoon$/^(")
    assert "DNSResolve" in skip and "layers" not in skip
    assert "DNSResolve" in profile.cases()
    assert "DNSResolve" not in profile.expected_cases()
    assert "HundredLayers" not in profile.cases()


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"skip": ["net"]}, "without a reason"),
        ({"skip": ["nets"], "harpoon": {"why_skipped": {"nets": "?"}}}, "unknown features"),
        ({"harpoon": {"why_skipped": {"net": "why"}}}, "missing from skip"),
        ({"harpoon": {"known_failures": {"Lifecycel": "typo"}}}, "no such cases"),
        (
            {"harpoon": {"why_skipped": {"OOM": "a"}, "known_failures": {"OOM": "b"}}},
            "both skipped and expected to fail",
        ),
    ],
)
def test_a_profile_that_does_not_add_up_is_refused(
    tmp_path: Path, fields: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ProfileError, match=problem):
        Profile.load(write_profile(tmp_path, **fields))


@pytest.mark.parametrize("name", ["shimtest-harpoon.json", "shimtest-runc.json"])
def test_the_repositorys_profiles_add_up(name: str) -> None:
    Profile.load(CONFORMANCE / name)


def test_a_workspace_finds_what_a_run_left_by_where_it_is_and_clean_up_removes_it() -> None:
    workspace = Workspace()
    env = {**os.environ, **workspace.environment()}
    # A process that names the workspace only in its environment, as a shim daemon does.
    left_running = subprocess.Popen(["sleep", "60"], env=env)
    try:
        state = Path(env["HARPOON_RUN_DIR"]) / "vm" / "0123abcd"
        state.mkdir(parents=True)
        (Path(env["TMPDIR"]) / "nb-1").mkdir()
        found = {(leftover.kind, leftover.what) for leftover in workspace.leftovers()}
        assert found == {
            ("process", f"pid {left_running.pid}: sleep 60"),
            ("file", str(state)),
            ("file", f"{env['TMPDIR']}/nb-1"),
        }
        workspace.clean_up()
        assert left_running.wait(timeout=5) == -signal.SIGKILL
        assert not workspace.root.exists()
    finally:
        left_running.kill()
        workspace.clean_up()


def test_a_workspaces_tmpdir_is_short_enough_for_shimtest_to_keep_its_sockets_there() -> None:
    workspace = Workspace()
    try:
        # shimtest falls back to /tmp for sockets when TMPDIR is longer than 26 bytes.
        assert len(workspace.environment()["TMPDIR"]) <= 26
    finally:
        workspace.clean_up()
