"""Optional: the run/exec benchmarks of containerd's shim conformance suite
(containerd/shimtest) against harpoon's shim and runc's.

shimtest drives a shim binary directly (no containerd) and builds its own test rootfs.
It is the build scripts/install-deps makes (`harpoon.devenv.tools.SHIMTEST`), run with
the profiles the conformance tests use (tests/conformance/shimtest-*.json), each in its
own workspace whose leftovers are removed; without the build the section says so and the
rest of the benchmark is unaffected.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.shimtest import Profile, Workspace, command
from harpoon.devenv.tools import SHIMTEST, installed_shim

PROFILE_DIR = Path(__file__).resolve().parents[1] / "tests" / "conformance"
#: One benchmark run of one shim.
RUN_TIMEOUT_S = 1800.0
#: The benchmarks of interest: start-up (with its phases), the whole lifecycle, exec.
BENCH_PATTERN = "BenchmarkShim/[^/]+/(Startup|StartupPhases|Lifecycle|Exec)$"
_RESULT = re.compile(r"^(BenchmarkShim/\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class ShimtestResult:
    """Benchmark lines (name → metric → value), or why there are none."""

    benchmarks: dict[str, dict[str, float]]
    error: str | None = None


def run(runc_shim: Path, runs: int) -> ShimtestResult:
    """Runs shimtest's benchmarks against harpoon's shim, then runc's."""
    harpoon_shim = installed_shim()
    missing = [str(p) for p in SHIMTEST.missing_binaries()]
    if harpoon_shim is None:
        return ShimtestResult({}, "shimtest unavailable: containerd-shim-harpoon-v1 is missing")
    if missing:
        return ShimtestResult({}, f"shimtest unavailable: missing {', '.join(missing)}")
    benchmarks: dict[str, dict[str, float]] = {}
    for runtime, shim in (("harpoon", harpoon_shim), ("runc", runc_shim)):
        flags = ["-test.run", "^$", "-test.bench", BENCH_PATTERN, "-test.benchtime", f"{runs}x"]
        try:
            output = _bench(Profile.load(PROFILE_DIR / f"shimtest-{runtime}.json"), shim, flags)
        except (RuntimeError, OSError, ValueError) as error:
            return ShimtestResult(benchmarks, f"shimtest against {runtime}: {error}")
        benchmarks.update(parse(output))
    return ShimtestResult(benchmarks)


def _bench(profile: Profile, shim: Path, flags: list[str]) -> str:
    """One shim's benchmark output; raises RuntimeError with its tail when it fails."""
    argv, env = command(profile, shim, flags)
    workspace = Workspace()
    env.update(workspace.environment())
    try:
        done = subprocess.run(
            argv, cwd=workspace.root, env=env, capture_output=True, text=True,
            timeout=RUN_TIMEOUT_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"did not finish in {RUN_TIMEOUT_S:.0f} s") from None
    finally:
        workspace.clean_up()
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout).split())[-800:]
        raise RuntimeError(f"exited with {done.returncode}: {why}")
    return done.stdout


def parse(output: str) -> dict[str, dict[str, float]]:
    """`go test -bench` lines → {benchmark: {unit: value}} (ns/op, ms/create, …)."""
    results: dict[str, dict[str, float]] = {}
    for match in _RESULT.finditer(output):
        metrics = match.group(3).split()
        results[match.group(1)] = {
            unit: float(value) for value, unit in zip(metrics[::2], metrics[1::2], strict=False)
        }
    return results
