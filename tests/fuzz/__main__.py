"""The long fuzz run: every target (or those named) under atheris, one after another.

    PYTHONPATH=src python -m tests.fuzz [--runs 1000000] [--keep DIR] [target ...]

(`scripts/fuzz` runs this.) Each target runs in its own process (libFuzzer owns the
process it runs in), one at a time, on --runs inputs, from a fresh seed corpus; its
libFuzzer log and crashing inputs go to a directory, kept if anything crashed or --keep
names one. Prints inputs, seconds and crashes per target; the exit status is 1 if any
target crashed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.fuzz.targets import TARGETS

DEFAULT_RUNS = 1_000_000


def run_target(
    name: str, runs: int, workdir: Path, libfuzzer_flags: list[str]
) -> dict[str, object]:
    """One target's FUZZ-RESULT (tests/fuzz/harness.py), its log in workdir/<name>.log."""
    log = workdir / f"{name}.log"
    with log.open("wb") as output:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.fuzz.harness",
                name,
                f"--runs={runs}",
                f"--corpus={workdir / name / 'corpus'}",
                f"--crash-dir={workdir / 'crashes'}",
                *libfuzzer_flags,
            ],
            stdout=subprocess.PIPE,
            stderr=output,
            check=False,
        )
    for line in done.stdout.decode().splitlines():
        if line.startswith("FUZZ-RESULT "):
            result: dict[str, object] = json.loads(line.removeprefix("FUZZ-RESULT "))
            return result
    raise SystemExit(f"{name}: the harness exited with {done.returncode} and no result; see {log}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--keep", type=Path, help="where to keep logs, corpora and crashes")
    parser.add_argument("--libfuzzer", action="append", default=[], help="a libFuzzer flag")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"no such target: {', '.join(unknown)}; there are {', '.join(TARGETS)}")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="harpoon-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    crashed = False
    print(f"{'target':<16} {'inputs':>9} {'seconds':>8} {'inputs/s':>8}  crashes")
    for name in args.targets or list(TARGETS):
        result = run_target(name, args.runs, workdir, args.libfuzzer)
        inputs, seconds = int(str(result["inputs"])), float(str(result["seconds"]))
        signatures = result["signatures"]
        assert isinstance(signatures, dict)
        crashed |= bool(signatures)
        found = "; ".join(f"{count}x {sig}" for sig, count in signatures.items()) or "0"
        rate = inputs / seconds if seconds else 0
        print(f"{name:<16} {inputs:>9} {seconds:>8.1f} {rate:>8.0f}  {found}", flush=True)
    if crashed or args.keep:
        print(f"logs, corpora and crashing inputs: {workdir}")
    else:
        shutil.rmtree(workdir)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
