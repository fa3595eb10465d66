"""Optional: containerd's shim conformance suite (`github.com/containerd/shimtest`) and
its run/exec benchmarks, against harpoon's shim and runc's.

shimtest drives a shim binary directly (no containerd) and builds its own test rootfs.
It is built once, at a pinned version, into the tools cache; when the Go module proxy
does not serve the module (see bench/README.md) the section reports why and the rest of
the benchmark is unaffected.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.tools import HARPOON_SHIM_BINARY, TOOLS_CACHE_DIR, go_binary, scripts_dir

SHIMTEST_MODULE = "github.com/containerd/shimtest"
#: The newest release listed on pkg.go.dev when this was written (June 2026).
SHIMTEST_VERSION = "v0.2.1"
SHIMTEST_DIR = TOOLS_CACHE_DIR / f"shimtest-{SHIMTEST_VERSION}"
SHIMTEST_BINARY = SHIMTEST_DIR / "shimtest.test"
#: Fetching the module and building the test binary (needs the proxy; minutes at most).
BUILD_TIMEOUT_S = 900.0
#: One benchmark run of both shims.
RUN_TIMEOUT_S = 1800.0
#: The benchmarks of interest: start-up (with its phases), the whole lifecycle, exec.
BENCH_PATTERN = "BenchmarkShim/[^/]+/(Startup|StartupPhases|Lifecycle|Exec)$"
#: Features harpoon does not have yet (shimtest's skip names).
HARPOON_SKIP = ("exec", "transfer", "uds")
_RESULT = re.compile(r"^(BenchmarkShim/\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class ShimtestResult:
    """Benchmark lines (name → metric → value), or why there are none."""

    benchmarks: dict[str, dict[str, float]]
    error: str | None = None


def _run(argv: list[str], cwd: Path | None, timeout_s: float, env: dict[str, str]) -> str:
    """Runs a build step; raises RuntimeError with its output's tail when it fails."""
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(argv)}` did not finish in {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited with {done.returncode}: {_why(done)}")
    return done.stdout


def _why(done: subprocess.CompletedProcess[str]) -> str:
    """The error of a failed step in one line (`go mod download -json` puts it in JSON)."""
    with contextlib.suppress(ValueError, TypeError):
        error = json.loads(done.stdout).get("Error")
        if error:
            return " ".join(str(error).split())
    return " ".join((done.stderr or done.stdout).split())[-800:]


def build() -> Path:
    """The cached shimtest test binary, building it first if needed."""
    if os.access(SHIMTEST_BINARY, os.X_OK):
        return SHIMTEST_BINARY
    go = go_binary()
    if go is None:
        raise RuntimeError("shimtest needs Go (its go.mod names 1.26): none on PATH")
    env = dict(os.environ, GOFLAGS="-mod=mod")
    listing = _run(
        [str(go), "mod", "download", "-json", f"{SHIMTEST_MODULE}@{SHIMTEST_VERSION}"],
        None, BUILD_TIMEOUT_S, env,
    )  # fmt: skip
    source = Path(json.loads(listing)["Dir"])
    with tempfile.TemporaryDirectory(prefix="hp-shimtest-") as work:
        tree = Path(work) / "shimtest"
        # The module cache is read-only and `make build` writes _output/.
        shutil.copytree(source, tree)
        for path in tree.rglob("*"):
            path.chmod(path.stat().st_mode | 0o200)
        _run(["make", "build"], tree, BUILD_TIMEOUT_S, env)
        SHIMTEST_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / "_output" / "shimtest.test", SHIMTEST_BINARY)
    return SHIMTEST_BINARY


def run(runc_shim: Path, runs: int) -> ShimtestResult:
    """Builds shimtest if needed and runs its benchmarks against both shims."""
    try:
        binary = build()
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        return ShimtestResult({}, f"shimtest {SHIMTEST_VERSION} unavailable: {error}")
    with tempfile.TemporaryDirectory(prefix="hp-shimtest-") as profiles:
        for name, shim, skip in (
            ("harpoon", scripts_dir() / HARPOON_SHIM_BINARY, HARPOON_SKIP),
            ("runc", runc_shim, ()),
        ):
            config = {"shim_binary": str(shim), "skip": list(skip)}
            (Path(profiles) / f"{name}.json").write_text(json.dumps(config))
        argv = [
            str(binary), "-test.run", "^$", "-test.bench", BENCH_PATTERN,
            "-test.benchtime", f"{runs}x", f"-shimtest.configdir={profiles}",
        ]  # fmt: skip
        env = dict(os.environ, PATH=f"{scripts_dir()}:{runc_shim.parent}:{os.environ['PATH']}")
        try:
            output = _run(argv, Path(profiles), RUN_TIMEOUT_S, env)
        except RuntimeError as error:
            return ShimtestResult({}, str(error))
    return ShimtestResult(parse(output))


def parse(output: str) -> dict[str, dict[str, float]]:
    """`go test -bench` lines → {benchmark: {unit: value}} (ns/op, ms/create, …)."""
    results: dict[str, dict[str, float]] = {}
    for match in _RESULT.finditer(output):
        metrics = match.group(3).split()
        results[match.group(1)] = {
            unit: float(value) for value, unit in zip(metrics[::2], metrics[1::2], strict=False)
        }
    return results
