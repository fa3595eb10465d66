"""`python -m bench` / `python bench/run.py`: every benchmark, one markdown table, JSON.

Starts a throw-away containerd (flavour 2.3 by default) with harpoon's shim on its PATH,
imports the busybox test image, runs each benchmark N times interleaved with its
baselines, prints the table on stdout (progress goes to stderr) and writes
`bench/results/<timestamp>.{md,json}`. Needs root, a built guest image, and the
containerd flavour's binaries (scripts/install-deps provides all three).

Whatever happens (an error, ^C, SIGTERM) the daemon, its shims and VMs, the floor VMs and
every temporary directory are gone when it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console

from bench import machine, report, scenarios, shimtest
from bench.baseline import Baseline, BaselineError
from bench.ctr import Ctr
from bench.scenarios import Bench
from bench.shimlog import ShimLog
from bench.stats import Figures
from harpoon.devenv.containerd import Containerd, ContainerdError, StopReport
from harpoon.devenv.images import build_busybox_image, default_cache_dir
from harpoon.devenv.tools import FLAVOURS, SHIMTEST, scripts_dir
from harpoon.guest import find_guest
from harpoon.shim.paths import vm_state_dir

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
#: harpoon.sandbox.template.TEMPLATES_ENV (kept here: a benchmark must not break when
#: the shim's internals move).
TEMPLATES_ENV = "HARPOON_TEMPLATES"
SECTIONS = ("startup", "stdout", "stdin", "idle", "concurrency")
DEFAULT_RUNS = 10
QUICK_RUNS = 3
DEFAULT_STDOUT_MIB = 256
QUICK_STDOUT_MIB = 64
DEFAULT_STDIN_MIB = 256
QUICK_STDIN_MIB = 64
DEFAULT_CONTAINERS = 10
#: Rounds of the concurrency benchmark: each is 4 x 10 containers (~3 min with harpoon
#: under TCG), so it does not follow --runs unless asked to.
DEFAULT_CONCURRENCY_RUNS = 3
QUICK_CONCURRENCY_RUNS = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--runs", type=int, help=f"runs per figure (default {DEFAULT_RUNS})")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke test: {QUICK_RUNS} runs, {QUICK_STDOUT_MIB} MiB of stdout and of stdin, "
        f"{QUICK_CONCURRENCY_RUNS} concurrency round",
    )  # fmt: skip
    parser.add_argument("--containerd", choices=sorted(FLAVOURS), default="2.3")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--stdout-mib", type=int, help=f"default {DEFAULT_STDOUT_MIB}")
    parser.add_argument("--stdin-mib", type=int, help=f"default {DEFAULT_STDIN_MIB}")
    parser.add_argument("--containers", type=int, default=DEFAULT_CONTAINERS,
                        help="containers per concurrency batch")  # fmt: skip
    parser.add_argument("--concurrency-runs", type=int,
                        help=f"rounds of the concurrency benchmark (default "
                        f"{DEFAULT_CONCURRENCY_RUNS})")  # fmt: skip
    parser.add_argument("--shimtest", action="store_true",
                        help="also run containerd/shimtest's benchmarks")  # fmt: skip
    parser.add_argument(
        "--templates", choices=("default", "off"), default="default",
        help="off: harpoon boots every VM cold (HARPOON_TEMPLATES=off for the shims)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-commit", metavar="REV",
        help="also measure harpoon at git revision REV of this repository, interleaved "
        "(runtime io.containerd.harpoon<short>.v1, its own guest and VM template)",
    )  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    quick = args.quick
    args.runs = args.runs or (QUICK_RUNS if quick else DEFAULT_RUNS)
    args.stdout_mib = args.stdout_mib or (QUICK_STDOUT_MIB if quick else DEFAULT_STDOUT_MIB)
    args.stdin_mib = args.stdin_mib or (QUICK_STDIN_MIB if quick else DEFAULT_STDIN_MIB)
    if args.concurrency_runs is None:
        args.concurrency_runs = QUICK_CONCURRENCY_RUNS if quick else DEFAULT_CONCURRENCY_RUNS
    args.sections = args.only or list(SECTIONS)
    return args


def _stop_report(stop: StopReport) -> dict[str, Any]:
    return {
        "daemon_killed": stop.daemon_killed,
        "leaked_shims": [str(s) for s in stop.leaked_shims],
        "killed_pids": stop.killed_pids,
        "unmounted": stop.unmounted,
    }


async def run_all(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Runs the sections; returns the metadata, figures and shimtest result to report."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    console.log("machine: reading versions, probing the accelerator")
    host = machine.describe(REPO)
    # Measured as installed: pip compiles a package's bytecode.
    host["stale_bytecode_compiled"] = machine.compile_harpoon()
    qemu = machine.qemu_binary()
    if qemu is None:
        raise SystemExit("no QEMU binary on PATH for this host's guests: run scripts/install-deps")
    guest, floor_image = find_guest(), find_guest(which="floor")
    figures = Figures()
    if args.templates == "off":
        # containerd passes its environment on to the shims it starts.
        os.environ[TEMPLATES_ENV] = "off"
    baseline = _baseline(args)
    daemon = Containerd(args.containerd, path_prepend=[scripts_dir()], log_level="debug")
    shimtest_result: shimtest.ShimtestResult | None = None
    cleanup: dict[str, Any] = {}
    bench: Bench | None = None
    try:
        if baseline is not None:
            _prepare_baseline(baseline, daemon, console)
        console.log(f"containerd {args.containerd}: starting a throw-away daemon")
        daemon.start()
        image = daemon.import_image(build_busybox_image(default_cache_dir()))
        bench = Bench(
            daemon=daemon, ctr=Ctr(daemon), image=image, guest=guest, floor_image=floor_image,
            qemu=qemu, accelerator=host["accelerator"], figures=figures, runs=args.runs,
            console=console,
            stdout_mib=args.stdout_mib, stdin_mib=args.stdin_mib, containers=args.containers,
            concurrency_runs=args.concurrency_runs, shim_log=ShimLog(daemon.log_path),
            templates=args.templates == "default", baseline=baseline,
        )  # fmt: skip
        await scenarios.warm_up(bench)
        if "startup" in args.sections:
            await scenarios.startup(bench)
        if "stdout" in args.sections:
            await scenarios.stdout_throughput(bench)
        if "stdin" in args.sections:
            await scenarios.stdin_throughput(bench)
        if "idle" in args.sections:
            await scenarios.idle(bench)
        if "concurrency" in args.sections:
            await scenarios.concurrency(bench)
        if args.shimtest:
            console.log(f"shimtest ({SHIMTEST.source.file_name}): running its benchmarks")
            runc_shim = daemon.flavour.binary("containerd-shim-runc-v2")
            shimtest_result = await asyncio.to_thread(shimtest.run, runc_shim, args.runs)
            console.log(shimtest_result.error or "shimtest: done")
        version = daemon.version
    finally:
        cleanup = _clean_up(daemon, bench, baseline, console)
    meta = {
        "started": started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": time.monotonic() - started,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": args.runs,
        "concurrency_runs": args.concurrency_runs,
        "containers": args.containers,
        "machine": host,
        "containerd": {"flavour": args.containerd, "version": version},
        "guest": {"kernel_release": guest.kernel_release, "digest": guest.digest},
        "templates": args.templates,
        "baseline": baseline.describe() if baseline else None,
        "cleanup": cleanup,
    }
    return {"meta": meta, "figures": figures, "shimtest": shimtest_result}


def _baseline(args: argparse.Namespace) -> Baseline | None:
    """The commit of `--baseline-commit`, resolved (nothing built yet)."""
    if not args.baseline_commit:
        return None
    try:
        return Baseline(REPO, args.baseline_commit, templates=args.templates == "default")
    except BaselineError as error:
        raise SystemExit(f"--baseline-commit: {error}") from error


def _prepare_baseline(baseline: Baseline, daemon: Containerd, console: Console) -> None:
    """Builds the baseline (see bench/baseline.py) and puts its shim on containerd's PATH."""
    try:
        baseline.prepare(lambda message: console.log(message, highlight=False))
    except BaselineError as error:
        raise SystemExit(f"--baseline-commit: {error}") from error
    daemon.path_prepend.append(baseline.bin_dir)


def _clean_up(
    daemon: Containerd, bench: Bench | None, baseline: Baseline | None, console: Console
) -> dict[str, Any]:
    """Removes every container, stops the daemon, kills what leaked, removes directories;
    says what had to be cleaned up."""
    console.log("cleaning up: containers, daemon, shims, VMs, temporary directories")
    if daemon.pid is not None:
        with contextlib.suppress(Exception):
            daemon.remove_all_containers()
    address = ""
    with contextlib.suppress(ContainerdError):
        address = daemon.address  # before stop(), which forgets it
    cleanup = _stop_report(daemon.stop())
    if baseline is not None:
        ids = _container_ids(bench, baseline_only=True)
        cleanup["baseline"] = baseline.cleanup(daemon.namespace, address, ids)
    cleanup["vm_state_dirs_removed"] = _remove_vm_state_dirs(bench)
    if any(cleanup.get(k) for k in ("leaked_shims", "vm_state_dirs_removed", "baseline")):
        console.log(f"[yellow]cleanup had to remove leftovers: {cleanup}")
    return cleanup


def _container_ids(bench: Bench | None, *, baseline_only: bool = False) -> list[str]:
    """Every container ID the run handed out (or only the baseline's)."""
    if bench is None:
        return []
    suffix = ""
    if baseline_only:
        assert bench.baseline is not None
        suffix = "-" + bench.runtimes[-1].id_part
    return [
        f"bench-{prefix}-{n}"
        for prefix, count in bench.used_ids().items()
        if prefix.endswith(suffix)
        for n in range(1, count + 1)
    ]


def _remove_vm_state_dirs(bench: Bench | None) -> list[str]:
    """harpoon's per-VM directories of our containers that outlived their shims (the
    baseline's are where harpoon.shim.paths puts them too: that module has not changed)."""
    if bench is None:
        return []
    removed = []
    for container_id in _container_ids(bench):
        path = vm_state_dir(bench.daemon.namespace, container_id)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, log_path=False)
    try:
        outcome = asyncio.run(run_all(args, console))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.log("[red]interrupted: cleaned up, no results written")
        return 130
    meta, figures, shimtest_result = outcome["meta"], outcome["figures"], outcome["shimtest"]
    text = report.markdown(meta, figures, shimtest_result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / meta["started"].replace("-", "").replace(":", "")
    stem.with_suffix(".md").write_text(text)
    document = report.to_json(meta, figures, shimtest_result)
    stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    sys.stdout.write(text)
    console.log(f"wrote {stem}.md and {stem}.json in {meta['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
