"""The short fuzz run of `scripts/test`: every atheris target (tests/fuzz/targets.py) on a
few thousand inputs from its seed corpus, with a fixed libFuzzer seed so that a run is
the same on every machine. The long run (`scripts/fuzz`, a million inputs per target)
is where new crashes are looked for; this keeps the targets working and the crashes
they found fixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS
from tests.prerequisites import unavailable

SHORT_RUNS = 3000
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_fuzz_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        unavailable("atheris is not installed (pip install -e '.[dev]')")
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.harness",
            target,
            f"--runs={SHORT_RUNS}",
            f"--corpus={tmp_path / 'corpus'}",
            f"--crash-dir={tmp_path / 'crashes'}",
            "-seed=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=False,
    )
    results = [
        json.loads(line.removeprefix("FUZZ-RESULT "))
        for line in done.stdout.decode().splitlines()
        if line.startswith("FUZZ-RESULT ")
    ]
    log = done.stderr.decode()[-4000:]
    assert results, f"the harness exited with {done.returncode} and no result:\n{log}"
    assert results[0]["inputs"] == SHORT_RUNS
    assert results[0]["signatures"] == {}, log
