"""Running containerd/shimtest against a shim: its profiles, its command line, its verdicts.

shimtest (built by `harpoon.devenv.tools`, `SHIMTEST`) drives a shim binary directly, with
no containerd, through a JSON *profile* (`-shimtest.config=FILE`): shimtest reads
`shim_binary`, `skip` (whole features: `exec`, `net`, `sandbox`, …), `format_mounts`,
`provide_network`; it ignores other keys, so a profile also carries ours, under
`"harpoon"`:

- `why_skipped`: every skipped feature and case, each with its reason. A case named
  there is left out of the run with `-test.skip`; a feature must also be in `skip`.
- `known_failures`: cases that run and are expected to fail, each with its reason (a
  fault to fix). One that passes is reported, so the entry goes when the fault does.
  `"leftovers"` there: the run is expected to leave shim daemons behind (and nothing
  else; see `Workspace`).

`-test.v` output becomes one `CaseResult` per case of the profile (subtests such as
`InitExitCodes/Exit42` fold into theirs), plus what shimtest said about the run as a
whole (its own leak check reports there).

A run's `Workspace` gives shimtest (TMPDIR: bundles, sockets, rootfs mounts) and
harpoon's shims (HARPOON_RUN_DIR: VM state, shares) private directories, so that what
is left afterwards is found by where it is, whatever else runs on the machine: shimtest's
own leak check looks for shim processes by executable name and cannot see a Python shim.

This module starts nothing; the conformance tests and bench/shimtest.py run the command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from harpoon.devenv.host import (
    ShimProcess,
    is_under,
    kill_process_trees,
    mount_points,
    processes_naming,
    unmount_under,
)
from harpoon.devenv.tools import SHIMTEST

#: shimtest's features (its profiles' `skip` values).
FEATURES = ("exec", "layers", "net", "oom", "sandbox", "transfer", "uds")

#: The cases of the suites run per shim, by feature, as of the pinned shimtest (f2937b6;
#: `run` is the suite no feature turns off). The sandbox, transfer and uds suites are not
#: listed: no profile runs them yet.
SUITES: dict[str, tuple[str, ...]] = {
    "run": ("Lifecycle", "InitExitCodes", "OutputThenExit", "Events", "FastExitInit"),
    "exec": (
        "Exec", "StdioRoundTrip", "LargeStdioRoundTrip", "StdinDetachReattach", "Clock",
        "ExitCodes", "LargeFileRead", "BindMountRead", "FastExitOutput",
        "ExecOutputDrainAfterExit", "ExecDiscardIO", "ExecCommandNotFound",
    ),
    "oom": ("OOM",),
    "layers": ("HundredLayers",),
    "net": (
        "OutboundTCP", "OutboundUDP", "DNSResolve", "InboundTCPListen",
        "LoopbackWithinContainer",
    ),
}  # fmt: skip

#: Runs until the test binary's deadline, and only without -test.short (which CI passes).
STRESS_CASE = "Stress"

#: The `known_failures` key that stands for "the run leaves shim daemons behind".
LEFTOVERS = "leftovers"

#: shimtest's one test function; every case is `TestShim/<profile>/<case>`.
TEST_FUNCTION = "TestShim"

Verdict = Literal["PASS", "FAIL", "SKIP"]

_EVENT = re.compile(r"^=== (?:RUN|NAME|CONT|PAUSE)\s+(\S+)\s*$")
_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(([\d.]+)s\)\s*$")


class ProfileError(ValueError):
    """A profile whose skips, reasons or known failures do not add up."""


@dataclass(frozen=True)
class Profile:
    """One shimtest profile file and the harpoon section in it."""

    path: Path
    skipped_features: tuple[str, ...]
    why_skipped: dict[str, str]
    known_failures: dict[str, str]

    @property
    def name(self) -> str:
        """shimtest names a profile's subtests after its file: `TestShim/<name>/…`."""
        return self.path.stem

    @property
    def skipped_cases(self) -> dict[str, str]:
        """The cases (not features) the run leaves out, with their reasons."""
        return {k: v for k, v in self.why_skipped.items() if k not in FEATURES}

    def cases(self) -> list[str]:
        """Every case of the features this profile runs, skipped cases included."""
        return [
            case
            for feature, cases in SUITES.items()
            if feature not in self.skipped_features
            for case in cases
        ]

    def expected_cases(self) -> set[str]:
        """The cases a run of this profile reports: its cases but the skipped ones, and
        Stress (which skips itself under -test.short)."""
        return {*self.cases(), STRESS_CASE} - set(self.skipped_cases)

    @classmethod
    def load(cls, path: Path) -> Profile:
        data = json.loads(path.read_text())
        ours = data.get("harpoon", {})
        profile = cls(
            path=path,
            skipped_features=tuple(data.get("skip", ())),
            why_skipped=dict(ours.get("why_skipped", {})),
            known_failures=dict(ours.get("known_failures", {})),
        )
        profile._check()
        return profile

    def _check(self) -> None:
        unknown = sorted(set(self.skipped_features) - set(FEATURES))
        unexplained = sorted(set(self.skipped_features) - set(self.why_skipped))
        not_skipped = sorted(
            k for k in self.why_skipped if k in FEATURES and k not in self.skipped_features
        )
        both = sorted(set(self.why_skipped) & set(self.known_failures))
        every_case = {case for cases in SUITES.values() for case in cases}
        names = {*self.why_skipped, *self.known_failures} - {*FEATURES, LEFTOVERS}
        strangers = sorted(names - every_case)
        problems = [
            f"no such cases in shimtest's suites: {strangers}" if strangers else "",
            f"unknown features in skip: {unknown} (known: {list(FEATURES)})" if unknown else "",
            f"features skipped without a reason in why_skipped: {unexplained}"
            if unexplained
            else "",
            f"why_skipped names features missing from skip: {not_skipped}" if not_skipped else "",
            f"both skipped and expected to fail: {both}" if both else "",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ProfileError(f"{self.path}: {'; '.join(problems)}")

    def test_flags(self) -> list[str]:
        """`-test.run`/`-test.skip` for this profile's cases (its fuzz target never runs)."""
        flags = ["-test.run", f"^{TEST_FUNCTION}$"]
        if self.skipped_cases:
            cases = "|".join(re.escape(c) for c in sorted(self.skipped_cases))
            flags += ["-test.skip", f"^{TEST_FUNCTION}$/^{re.escape(self.name)}$/^({cases})$"]
        return flags


def command(profile: Profile, shim: Path, flags: list[str]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a shimtest run of `profile` against `shim`.

    SHIM_BINARY overrides the profile's (bare) `shim_binary` with the exact binary, and
    SHIMTEST_TESTBIN names the container's test binary, so the run needs neither PATH
    nor shimtest's source tree as its working directory.
    """
    argv = [str(SHIMTEST.binary), *flags, f"-shimtest.config={profile.path.resolve()}"]
    env = dict(os.environ, SHIM_BINARY=str(shim), SHIMTEST_TESTBIN=str(SHIMTEST.testbin))
    return argv, env


@dataclass
class CaseResult:
    """One case's verdict and everything it (and its subtests) printed."""

    verdict: Verdict
    seconds: float
    output: list[str] = field(default_factory=list)
    failed_subtests: list[str] = field(default_factory=list)


@dataclass
class Report:
    """A `-test.v` run of one profile: its cases, and shimtest's word on the whole run."""

    cases: dict[str, CaseResult]
    #: What the profile's own test printed (shimtest's leak check reports there).
    own_output: list[str]
    #: The profile's own verdict; FAIL also when only its own checks failed.
    verdict: Verdict | None


def parse(output: str, profile_name: str) -> Report:
    """Reads `go test -test.v` output of a run of one profile (tests run one at a time)."""
    prefix = f"{TEST_FUNCTION}/{profile_name}"
    lines_of: dict[str, list[str]] = {}
    verdicts: dict[str, tuple[Verdict, float]] = {}
    current: str | None = None
    for line in output.splitlines():
        if event := _EVENT.match(line):
            current = event.group(1)
            continue
        if result := _RESULT.match(line):
            verdict: Verdict = result.group(1)  # type: ignore[assignment]
            verdicts[result.group(2)] = (verdict, float(result.group(3)))
            # What follows a verdict is a test's only after the next `===` line.
            current = None
            continue
        # A test's output is indented; `FAIL`, `PASS`, `ok` at the margin are the binary's.
        if current is not None and line.startswith(" "):
            lines_of.setdefault(current, []).append(line)
    cases: dict[str, CaseResult] = {}
    for name, (verdict, seconds) in verdicts.items():
        relative = name.removeprefix(prefix + "/")
        if not name.startswith(prefix + "/") or "/" in relative:
            continue
        case = CaseResult(verdict, seconds, list(lines_of.get(name, [])))
        for sub, (sub_verdict, _) in verdicts.items():
            if sub.startswith(name + "/"):
                case.output += lines_of.get(sub, [])
                if sub_verdict == "FAIL":
                    case.failed_subtests.append(sub.removeprefix(name + "/"))
        cases[relative] = case
    own = verdicts.get(prefix)
    return Report(cases, lines_of.get(prefix, []), own[0] if own else None)


LeftoverKind = Literal["shim daemon", "process", "mount", "file"]


@dataclass(frozen=True)
class Leftover:
    kind: LeftoverKind
    what: str

    def __str__(self) -> str:
        return f"{self.kind} {self.what}"


class Workspace:
    """A shimtest run's private directories (see the module's docstring); `leftovers()`
    after the run, then `clean_up()`, which kills and removes what was left."""

    #: shimtest keeps its sockets in TMPDIR only when TMPDIR is at most 26 bytes long
    #: (else /tmp): short names under a short root.
    _TMP = "t"
    _RUN = "run"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hp-st-", dir="/tmp"))
        (self.root / self._TMP).mkdir()
        (self.root / self._RUN).mkdir()

    def environment(self) -> dict[str, str]:
        """What the run's environment must add (shimtest passes it on to the shims)."""
        return {"TMPDIR": str(self.root / self._TMP), "HARPOON_RUN_DIR": str(self.root / self._RUN)}

    def _processes(self) -> list[ShimProcess]:
        return processes_naming(self.root)

    def leftovers(self) -> list[Leftover]:
        """What the run left: live processes naming the workspace (shims, VMMs, helpers),
        mounts in it, shimtest's temporary files, harpoon's VM state and share dirs."""
        found = [
            Leftover("shim daemon" if p.binary else "process", str(p)) for p in self._processes()
        ]
        found += [Leftover("mount", m) for m in mount_points() if is_under(m, self.root)]
        run = self.root / self._RUN
        files = [*(self.root / self._TMP).iterdir()]
        files += [e for d in (run / "vm", run / "share") if d.is_dir() for e in d.iterdir()]
        found += [Leftover("file", str(f)) for f in sorted(files)]
        return found

    def clean_up(self) -> None:
        """Kills what the run left running, unmounts and removes the workspace."""
        kill_process_trees(self._processes())
        unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
