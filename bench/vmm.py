"""What vfkit's lack of save/restore costs in start time: `ctr run` under runc, harpoon on
QEMU restoring a VM template, harpoon on QEMU booting cold and harpoon through the vfkit
test double (cold, every time), side by side in one run.

    python -m bench.vmm [--runs 5] [--only CONFIG…] [--no-floor] [--keep DIR]   # or bench/vmm.py
    python -m bench.vmm --table bench/results/vmm-<stamp>.json       # the table again

vfkit cannot save or restore a VM (vfkit issue #449), so under harpoon's vfkit backend
every container's VM boots cold, where QEMU restores a saved guest from a VM template.
The configurations, the table's columns, each with a throw-away containerd (2.3 by
default) of its own, because a shim takes its backend settings from the environment it
inherits from containerd:

- `runc`: io.containerd.runc.v2;
- `qemu-template`: harpoon on QEMU (HARPOON_VMM=qemu), its VMs restored from the template
  store's VM template;
- `qemu-cold`: the same with HARPOON_TEMPLATES=off: every VM boots cold;
- `vfkit-double`: harpoon's vfkit backend (HARPOON_VMM=vfkit) running harpoon's vfkit test
  double (harpoon.devenv.vfkit_double, installed as a `vfkit` program that HARPOON_VFKIT
  names): cold, every time.

In every round, each configuration (the first one a round further along the list each
round, so that none always runs after the same one) runs:

- `ctr run --rm --net-host busybox true`: launch → ctr's exit;
- then, after every configuration has run that, `ctr run --rm --net-host busybox echo
  hi`: launch → the first byte of its output (the output must be `hi`);
- for harpoon, both runs' VM start → agent ready, from the shim's `created ID: VM pid N
  started in X s (restored|cold boot)` line in containerd's debug log (bench/shimlog.py),
  and how many VMs were restored from a template;
- once a round, first, the boot floor (bench/floor.py): QEMU, harpoon's kernel and a
  busybox-only initramfs, launch → marker (`--no-floor` leaves it out).

The table gives the median (p95) of each figure and its ratio to runc's median, then the
cost of booting cold: qemu-cold ÷ qemu-template, vfkit-double ÷ qemu-template and
vfkit-double ÷ qemu-cold, as ratios of medians with the min-max of the per-round ratios
(the two runs of a round ran minutes apart at most), and as differences of medians.

**What the double's figures are.** The double runs the guest in QEMU, on these Linux
machines under TCG: its absolute times are not a Mac's (VZ, hardware virtualization).
What it shows is the cold boot on the vfkit path (virtiofs through virtiofsd, the vsock
through vhost-device-vsock, a Python program in front of QEMU) beside a template restore
under the same emulator. What a Mac user pays with vfkit relative to QEMU-HVF's template
restore is a cold boot against a restore of the same VM: the ratio qemu-cold ÷
qemu-template carries over, not the seconds.

harpoon is this checkout's (a wrapper shim, bench/checkout.py) with the guest image and
template store harpoon's settings name ($HARPOON_GUEST_DIR, $HARPOON_TEMPLATE_DIR, else
under /var/lib/harpoon): the bench builds neither. One unmeasured round comes first; if
qemu-template's VM booted cold there (no template for it yet), the bench waits for the
one its shim's background builder makes, as a user's next container would.

Leaves nothing, also on an error, ^C or SIGTERM: each daemon's containers are removed,
the daemon stopped and its leaked shims killed with their VMs and doubles
(harpoon.devenv.Containerd), harpoon's per-VM directories of the bench's containers
removed, any process still naming the bench's scratch directory killed; what had to be
removed is listed (`leftovers` in the JSON, empty on a clean run). Prints a markdown
table; writes JSON to bench/results/vmm-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/vmm.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import machine
from bench.checkout import REPO, HarpoonDirs, wrapper_shim
from bench.ctr import RUNC_RUNTIME, Ctr, CtrResult
from bench.floor import boot_floor
from bench.report import exit_on_sigterm, number, print_and_save, say
from bench.shimlog import ShimLog
from bench.stats import quantile
from harpoon import dirs
from harpoon.devenv.containerd import Containerd
from harpoon.devenv.host import processes_naming
from harpoon.devenv.images import build_busybox_image, default_cache_dir
from harpoon.devenv.vfkit_double import VFKIT_ENV, install_wrapper
from harpoon.guest import GuestNotBuiltError, find_guest
from harpoon.sandbox.template import META_NAME, TEMPLATES_ENV
from harpoon.shim import paths
from harpoon.vmm.choice import VMM_ENV


@dataclass(frozen=True)
class Config:
    """One column: a runtime and the backend settings its shims inherit."""

    label: str
    harpoon: bool
    env: dict[str, str] = field(default_factory=dict)


CONFIGS = {
    "runc": Config("runc", harpoon=False),
    # Both QEMU columns name their backend and template setting, so that neither follows
    # a value the caller's shell happens to export.
    "qemu-template": Config(
        "harpoon QEMU, template restore", True, {VMM_ENV: "qemu", TEMPLATES_ENV: "on"}
    ),
    "qemu-cold": Config("harpoon QEMU, cold boot", True, {VMM_ENV: "qemu", TEMPLATES_ENV: "off"}),
    # HARPOON_VFKIT, the double's wrapper, is added when it is installed.
    "vfkit-double": Config(
        "harpoon vfkit double, cold boot", True, {VMM_ENV: "vfkit", TEMPLATES_ENV: "on"}
    ),
}


@dataclass(frozen=True)
class Run:
    """A measured `ctr run`: the command in the container, the output it must print, and
    what is timed from ctr's launch: its first output, else its exit."""

    key: str
    command: tuple[str, ...]
    expected: bytes
    until_first_output: bool
    label: str


RUNS = (
    Run("exit", ("true",), b"", False, "`ctr run --rm --net-host busybox true`, launch → exit"),
    Run("first-output", ("echo", "hi"), b"hi\n", True,
        "`ctr run --rm --net-host busybox echo hi`, launch → first output"),
)  # fmt: skip
VM_FIGURE = ("vm", "VM start → agent ready (shim log)")
#: The cold-boot comparisons: (top, bottom, column header).
COMPARISONS = (
    ("qemu-cold", "qemu-template", "QEMU cold ÷ QEMU template"),
    ("vfkit-double", "qemu-template", "vfkit double ÷ QEMU template"),
    ("vfkit-double", "qemu-cold", "vfkit double ÷ QEMU cold"),
)
DEFAULT_RUNS = 5
#: One `ctr run --rm` (a cold boot through the double takes ~10 s under TCG).
RUN_TIMEOUT_S = 180.0
#: How long the template a cold-booted warm-up VM left its shim to build may take.
TEMPLATE_WAIT_S = 600.0
POLL_INTERVAL_S = 0.2


@dataclass
class Column:
    """One configuration's daemon, its ctr and its shims' log."""

    name: str
    config: Config
    runtime: str
    daemon: Containerd
    image: str
    ctr: Ctr = field(init=False)
    log: ShimLog = field(init=False)

    def __post_init__(self) -> None:
        self.ctr = Ctr(self.daemon)
        self.log = ShimLog(self.daemon.log_path)


@dataclass
class Measured:
    """Everything the rounds measured (the JSON's body). Samples are per round (per round
    and run for "vm"), None where a run failed, so that the columns' i-th samples pair."""

    samples: dict[str, dict[str, list[float | None]]]
    #: Per harpoon column, how each measured VM started (shim log).
    starts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    floor: list[float] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)
    #: The machine's 1-minute load average before and after each round.
    load: list[tuple[float, float]] = field(default_factory=list)
    warmup: list[str] = field(default_factory=list)

    def fail(self, where: str, why: str) -> None:
        self.failures.setdefault(where, []).append(why)
        say(f"  {where} failed: {why}")


def timed(result: CtrResult, run: Run) -> tuple[float | None, str | None]:
    """The run's time, or None and why it does not count (it failed, or did not print
    exactly what it must)."""
    if not result.ok:
        return None, result.failure()
    if result.stdout != run.expected:
        said = f"`ctr {' '.join(result.argv)}` printed {result.stdout[:200]!r}"
        return None, f"{said}, not {run.expected!r}"
    return (result.first_byte_s if run.until_first_output else result.seconds), None


class Rounds:
    """The warm-up and the measured rounds over the columns."""

    def __init__(
        self, columns: list[Column], args: argparse.Namespace, harpoon: HarpoonDirs
    ) -> None:
        self.columns = columns
        self.args = args
        self.harpoon = harpoon
        self.ids: dict[str, list[str]] = {c.name: [] for c in columns}
        keys = [run.key for run in RUNS] + [VM_FIGURE[0]]
        self.measured = Measured({c.name: {key: [] for key in keys} for c in columns})

    async def run(self) -> Measured:
        say("warm-up round (not measured)")
        await self.round(0)
        for round_ in range(1, self.args.runs + 1):
            load_before, began = os.getloadavg()[0], time.monotonic()
            await self.round(round_)
            self.measured.load.append((load_before, os.getloadavg()[0]))
            say(f"round {round_} of {self.args.runs}: {time.monotonic() - began:.0f} s")
        return self.measured

    async def round(self, round_: int) -> None:
        """Round 0 warms up (page cache, first starts, the template): nothing recorded."""
        if not self.args.no_floor:
            await self.floor(round_)
        shift = round_ % len(self.columns)
        order = self.columns[shift:] + self.columns[:shift]
        for run in RUNS:
            for column in order:
                await self.one(column, round_, run)

    async def floor(self, round_: int) -> None:
        qemu = machine.qemu_binary()
        if qemu is None:
            raise SystemExit("no QEMU binary on PATH for this host's guests (the boot floor)")
        floor_image = find_guest(guest_dir=self.harpoon.guest, which="floor")
        boot = await boot_floor(floor_image, qemu, machine.accelerator())
        if not round_:
            return
        if boot.seconds is None:
            self.measured.fail("floor", boot.error or "no marker")
        else:
            self.measured.floor.append(boot.seconds)
            say(f"  boot floor {boot.seconds:.2f} s")

    async def one(self, column: Column, round_: int, run: Run) -> None:
        container_id = f"vmm-{column.name}-{run.key}-{round_}"
        self.ids[column.name].append(container_id)
        result = await column.ctr.run_container(
            column.runtime, column.image, container_id, *run.command,
            timeout_s=RUN_TIMEOUT_S, options=("--net-host",),
        )  # fmt: skip
        took, problem = timed(result, run)
        said = f"{column.name} {run.key}: " + (f"{took:.2f} s" if took is not None else "failed")
        vm_seconds = None
        if column.config.harpoon:
            start = await column.log.start(container_id)
            vm_seconds = start.seconds
            how = {"template": "restored", "cold": "cold boot"}.get(start.mode or "", "unknown")
            said += f" (VM {how}" + (f" in {start.seconds:.2f} s)" if start.seconds else ")")
            if start.failed_boots:
                said += f" after a boot given up on: {'; '.join(start.failed_boots)}"
            if round_:
                self.measured.starts.setdefault(column.name, []).append(
                    {"id": container_id, "run": run.key, **asdict(start)}
                )
            elif column.name == "qemu-template" and start.mode == "cold":
                said += "; " + await self.wait_for_template()
        say(f"  {said}")
        if not round_:
            self.measured.warmup.append(said + (f": {problem}" if problem else ""))
            return
        if problem:
            self.measured.fail(column.name, problem)
        samples = self.measured.samples[column.name]
        samples[run.key].append(took)
        samples[VM_FIGURE[0]].append(None if problem else vm_seconds)

    def template_keys(self) -> set[str]:
        return {meta.parent.name for meta in self.harpoon.templates.glob(f"*/{META_NAME}")}

    async def wait_for_template(self) -> str:
        """The shim of a VM that booted cold for want of a template builds it in the
        background (harpoon.sandbox.template_builder): waits for it to appear."""
        known, deadline = self.template_keys(), time.monotonic() + TEMPLATE_WAIT_S
        while not (new := self.template_keys() - known):
            if time.monotonic() > deadline:
                return f"no template built within {TEMPLATE_WAIT_S:.0f} s"
            await asyncio.sleep(POLL_INTERVAL_S)
        return f"template {', '.join(sorted(new))} built"


# -- set-up and clean-up ------------------------------------------------------------------


@contextlib.contextmanager
def columns_started(
    args: argparse.Namespace, scratch: Path, harpoon: HarpoonDirs, left: list[str]
) -> Iterator[list[Column]]:
    """A daemon per configuration, each with the busybox image; on the way out (also on
    an error, ^C or SIGTERM) their containers removed and the daemons stopped, what that
    had to clean up appended to `left`."""
    shims = scratch / "shims"
    shims.mkdir()
    harpoon_runtime = wrapper_shim(shims, "harpoon", harpoon.environment())
    vfkit = install_wrapper(scratch / "vfkit")
    image_tar = build_busybox_image(default_cache_dir())
    with contextlib.ExitStack() as stack:
        columns = []
        for name in args.only:
            config = CONFIGS[name]
            env = config.env | ({VFKIT_ENV: str(vfkit)} if name == "vfkit-double" else {})
            # Debug: containerd copies the shims' log lines (VM starts) into its log.
            daemon = Containerd(
                args.containerd, path_prepend=[shims], log_level="debug", extra_env=env
            )
            stack.callback(_stop, name, daemon, left, args.keep)
            say(f"{name}: containerd {args.containerd} with {env or 'no extra environment'}")
            daemon.start()
            image = daemon.import_image(image_tar)
            runtime = harpoon_runtime if config.harpoon else RUNC_RUNTIME
            columns.append(Column(name, config, runtime, daemon, image))
        yield columns


def _stop(name: str, daemon: Containerd, left: list[str], keep: Path | None) -> None:
    if daemon.pid is not None:
        with contextlib.suppress(Exception):
            if removed := daemon.remove_all_containers():
                left.append(f"{name}: containers {removed}")
    if keep is not None and daemon.pid is not None:
        # Before stop(), which removes the daemon's directory and its log with it.
        keep.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(daemon.log_path, keep / f"{name}-containerd.log")
    report = daemon.stop()
    if not report.clean:
        left.append(f"{name}: {report}")


def leftovers(scratch: Path, namespace: str, ids: dict[str, list[str]]) -> list[str]:
    """After the daemons stopped: harpoon's per-VM directories of the bench's containers,
    removed, and processes naming the scratch directory (on PATH or in HARPOON_VFKIT of
    every shim, VM and double the daemons started), killed; what there was."""
    found = []
    for container_id in (i for column_ids in ids.values() for i in column_ids):
        for kind, path in (
            ("VM state", paths.vm_state_dir(namespace, container_id)),
            ("rootfs share", paths.share_dir(namespace, container_id)),
        ):
            if path.exists():
                found.append(f"{kind} {path} ({container_id})")
                shutil.rmtree(path, ignore_errors=True)
    for process in processes_naming(scratch):
        found.append(f"process {process.pid}: {' '.join(process.argv)[:200]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run: daemons, rounds, clean-up; the record (JSON)."""
    exit_on_sigterm()
    started = time.monotonic()
    began_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    described = machine.describe(REPO)
    # Measured as installed: pip compiles a package's bytecode (bench/README.md).
    described["stale_bytecode_compiled"] = machine.compile_harpoon()
    harpoon = HarpoonDirs(Path(dirs.guest_dir()), Path(dirs.template_dir()), {})
    try:  # a clear error now if there is no guest image
        find_guest(guest_dir=harpoon.guest)
    except GuestNotBuiltError as error:
        raise SystemExit(str(error)) from error
    left: list[str] = []
    ids: dict[str, list[str]] = {}
    namespace = "default"
    # Short, in /tmp: the doubles' and containerd's sockets live under it.
    scratch = Path(tempfile.mkdtemp(prefix="hp-vmm-", dir="/tmp"))
    try:
        with columns_started(args, scratch, harpoon, left) as columns:
            namespace = columns[0].daemon.namespace
            rounds = Rounds(columns, args, harpoon)
            ids = rounds.ids
            measured = asyncio.run(rounds.run())
            versions = {c.name: c.daemon.version for c in columns}
    finally:
        left += leftovers(scratch, namespace, ids)
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "began": began_utc, "machine": described,
        "containerd": versions, "guest_dir": str(harpoon.guest),
        "template_dir": str(harpoon.templates), **asdict(measured), "leftovers": left,
        "seconds": time.monotonic() - started,
    }  # fmt: skip


# -- the table ----------------------------------------------------------------------------


def _values(samples: list[float | None]) -> list[float]:
    return [s for s in samples if s is not None]


def _median(samples: list[float | None]) -> float | None:
    values = _values(samples)
    return quantile(values, 0.5) if values else None


def _cell(samples: list[float | None]) -> str:
    values = _values(samples)
    if not values:
        return "n/a"
    return f"{number(quantile(values, 0.5))} ({number(quantile(values, 0.95))})"


def comparison(top: list[float | None], bottom: list[float | None]) -> str:
    """top ÷ bottom: the ratio of medians, the min-max of the per-round ratios (runs that
    failed on either side left out) and the difference of medians."""
    a, b = _median(top), _median(bottom)
    if a is None or not b:
        return "n/a"
    pairs = [x / y for x, y in zip(top, bottom, strict=True) if x is not None and y]
    spread = f" ({number(min(pairs))}-{number(max(pairs))})" if len(pairs) > 1 else ""
    return f"{number(a / b)}x{spread}, {a - b:+.2f} s"


def table(record: dict[str, Any]) -> str:
    """The markdown of a run's record (the JSON)."""
    samples: dict[str, dict[str, list[float | None]]] = record["samples"]
    names = list(samples)
    described = record.get("machine", {})
    lines = [
        f"{record['began']}: {record['args']['runs']} round(s), median (p95) seconds, and "
        f"each median ÷ runc's; {described.get('nproc')} cores, "
        f"{described.get('accelerator')}; whole run {record['seconds']:.0f} s",
        "",
        "| figure | " + " | ".join(CONFIGS[n].label for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    runc = samples.get("runc")
    for run in RUNS:
        cells = [_cell(samples[n][run.key]) for n in names]
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
        if runc is not None:
            base = _median(runc[run.key])
            ratios = [_median(samples[n][run.key]) for n in names]
            cells = [f"{number(r / base)}x" if r is not None and base else "n/a" for r in ratios]
            lines.append("| ÷ runc | " + " | ".join(cells) + " |")
    vm_cells = [_cell(samples[n][VM_FIGURE[0]]) if CONFIGS[n].harpoon else "-" for n in names]
    lines.append(f"| {VM_FIGURE[1]} | " + " | ".join(vm_cells) + " |")
    starts: dict[str, list[dict[str, Any]]] = record.get("starts", {})
    restored = [_restored(starts.get(n)) if CONFIGS[n].harpoon else "-" for n in names]
    lines.append("| VMs restored from a template | " + " | ".join(restored) + " |")
    retried = [_retried(starts.get(n)) if CONFIGS[n].harpoon else "-" for n in names]
    lines.append("| runs whose first cold boot was given up on and booted again | "
                 + " | ".join(retried) + " |")  # fmt: skip
    lines += _floor_lines(record) + _comparison_lines(samples) + _notes(record, starts)
    return "\n".join(lines)


def _restored(starts: list[dict[str, Any]] | None) -> str:
    if not starts:
        return "n/a"
    return f"{sum(s['mode'] == 'template' for s in starts)} of {len(starts)}"


def _retried(starts: list[dict[str, Any]] | None) -> str:
    if not starts:
        return "n/a"
    return f"{sum(bool(s.get('failed_boots')) for s in starts)} of {len(starts)}"


def _floor_lines(record: dict[str, Any]) -> list[str]:
    floor = record.get("floor") or []
    if not floor:
        return []
    return [
        "",
        f"Boot floor (QEMU, harpoon's kernel, a busybox initramfs; launch → marker): "
        f"{_cell(floor)} s over {len(floor)} boots.",
    ]


def _comparison_lines(samples: dict[str, dict[str, list[float | None]]]) -> list[str]:
    shown = [c for c in COMPARISONS if c[0] in samples and c[1] in samples]
    if not shown:
        return []
    lines = [
        "",
        "The cost of booting cold: ratio of medians (min-max of the per-round ratios), "
        "difference of medians:",
        "",
        "| figure | " + " | ".join(header for *_, header in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for key, label in [(run.key, run.label) for run in RUNS] + [VM_FIGURE]:
        cells = [comparison(samples[top][key], samples[bottom][key]) for top, bottom, _ in shown]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _notes(record: dict[str, Any], starts: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["", "Why VMs booted cold, as the shims said (with templates off they say nothing): "]
    reasons = {
        f"{name}: {s['cold_reason']}"
        for name, started in starts.items()
        for s in started
        if s.get("cold_reason")
    }
    lines[-1] += "; ".join(sorted(reasons)) or "nothing said"
    given_up = sorted(
        f"{name} {s['id']}: {reason}"
        for name, started in starts.items()
        for s in started
        for reason in s.get("failed_boots") or ()
    )
    if given_up:
        lines += [
            "",
            "Cold boots whose agent did not answer within 60 s (harpoon.sandbox.sandbox's "
            "BOOT_TIMEOUT_S) were given up on and booted again: their run's time includes "
            "the 60 s, their VM start (shim log) is the second boot's alone. As the shims "
            "said: " + "; ".join(given_up),
        ]
    if "vfkit-double" in starts:
        lines += [
            "",
            "The vfkit double runs its guest in QEMU (here under "
            f"{record.get('machine', {}).get('accelerator')}, on Linux): its seconds are not "
            "a Mac's. It shows the vfkit path's cold boot (virtiofs, vhost-device-vsock, a "
            "Python program in front of QEMU) beside a template restore under the same "
            "emulator; what a Mac user pays with vfkit relative to QEMU-HVF's template "
            "restore is the ratio QEMU cold ÷ QEMU template.",
        ]
    if failures := record.get("failures"):
        counts = "; ".join(f"{name} {len(failed)}" for name, failed in failures.items())
        lines += ["", f"Failed runs (the JSON says why): {counts}"]
    if load := record.get("load"):
        said = ", ".join(f"{before:.1f} → {after:.1f}" for before, after in load)
        lines += ["", f"Load average (1 min) before → after each round: {said}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vmm", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="measured rounds")
    parser.add_argument("--containerd", default="2.3", help="containerd release line")
    parser.add_argument(
        "--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="columns"
    )
    parser.add_argument("--no-floor", action="store_true", help="leave the boot floor out")
    parser.add_argument(
        "--keep", type=Path, help="copy each daemon's debug log (the shims' lines) here"
    )
    parser.add_argument("--table", type=Path, help="print the table of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        record = run(args)
    except KeyboardInterrupt:
        say("interrupted: cleaned up, no results written")
        return 130
    path = print_and_save("vmm", table(record), record)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
