"""9p vs virtiofs, side by side in one run: file I/O on a container's rootfs and on a
bind mount, under harpoon with each share, under runc, and on the host itself.

    python -m bench.share [--mib 256] [--files 20000 | --quick] [--runs 1]

Workloads, each timed inside the container by the guest's (or host's) /proc/uptime
(10 ms resolution), on the rootfs (a directory of the image's root) and on a bind
mount of a host directory (`ctr run --mount type=bind,…`):

- `write`: `dd` of --mib MiB of zeros (1 MiB blocks), then `sync`;
- `read`: `dd` of that file back (whatever the runtime caches: runc and the host read
  their page cache; harpoon's shares cache no file data in the guest);
- `untar`: `tar x` of a tarball of --files small files (0-4 KiB, 100 a directory),
  built here on the host, then `sync` (on the rootfs, the tarball is first copied there,
  untimed, so that it is read from the filesystem measured);
- `find`: `find | wc -l` over the tree just unpacked.

Runtimes, interleaved per round: `host` (busybox sh on a host directory: its rootfs
and bind figures are the same filesystem), `runc` (containerd's runc shim: overlayfs
rootfs, bind mount), and harpoon as a user gets it with each share: `harpoon-9p` (its
VMs restored from the VM template, bind mount and all), `harpoon-9p-cold` (templates
off: what a cold boot would weigh against virtiofs) and `harpoon-virtiofs` (every VM
boots cold: QEMU 7.2 cannot save a vhost-user-fs device). With --only, also
`harpoon-virtiofs-auto` (virtiofsd's --cache=auto). Each harpoon variant is a wrapper
shim of its own runtime name, `containerd-shim-<name>-v1`, that runs this checkout's
harpoon with the variant's environment and a guest image and template store of the
bench's own, built first (other sessions on the machine may rebuild the machine-wide
guest while this runs).
Only the workload is timed, never the start; the table says how many of each variant's
VMs were restored from the template (the shim's `created ID: … (restored|cold boot)` in
containerd's log, bench.shimlog) and why the others booted cold. Prints a markdown
table and writes JSON to bench/results/share-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from bench.checkout import REPO, HarpoonDirs, prepare_harpoon, wrapper_shim
from bench.ctr import Ctr
from bench.report import say
from bench.shimlog import ShimLog, VMStart
from harpoon.devenv.containerd import Containerd
from harpoon.devenv.images import build_busybox_image, default_cache_dir
from harpoon.sandbox.plan import SHARE_FS_ENV
from harpoon.sandbox.template import TEMPLATES_ENV
from harpoon.vmm.virtiofsd import CACHE_ENV

RESULTS = REPO / "bench" / "results"
WORKLOADS = ("write", "read", "untar", "find")
PLACES = ("rootfs", "bind")
FILES_PER_DIRECTORY = 100
#: The issue's size, and --quick's (20,000 files take ~10-25 min per harpoon runtime and
#: place under TCG).
DEFAULT_FILES = 20000
QUICK_FILES = 2000


@dataclass(frozen=True)
class Variant:
    """How one harpoon runtime of the bench runs its shims."""

    share_fs: str  # HARPOON_SHARE_FS
    templates: bool = True  # False: HARPOON_TEMPLATES=off, every VM boots cold
    virtiofs_cache: str = ""  # HARPOON_VIRTIOFS_CACHE ("": harpoon's own, never)

    @property
    def restores(self) -> bool:
        """Its VMs restore the template (QEMU 7.2 cannot save a virtiofs device)."""
        return self.templates and self.share_fs != "virtiofs"


HARPOON_VARIANTS = {
    "harpoon-9p": Variant("9p"),
    "harpoon-9p-cold": Variant("9p", templates=False),
    "harpoon-virtiofs": Variant("virtiofs"),
    # Only with --only: virtiofsd --cache=auto (names and attributes cached 1 s).
    "harpoon-virtiofs-auto": Variant("virtiofs", virtiofs_cache="auto"),
}
DEFAULT_RUNTIMES = ["host", "runc", "harpoon-9p", "harpoon-9p-cold", "harpoon-virtiofs"]
#: A container's whole script: under TCG on a loaded machine 9p took up to ~75 ms a
#: file unpacked, on each of the two places, plus `find` and the sequential part.
RUN_TIMEOUT_BASE_S = 900.0
RUN_TIMEOUT_PER_FILE_S = 0.3
UPTIME_RESOLUTION_S = 0.01
START_LABELS = {"template": "restored", "cold": "cold boot"}

SCRIPT = r"""
set -e
t() { read u _ < /proc/uptime; echo "T $1 $u"; }
place() {  # name directory tarball
  d="$2/hp-share-bench"; mkdir -p "$d"
  t "$1.write.start"; dd if=/dev/zero of="$d/big" bs=1M count=$MIB 2>/dev/null; sync
  t "$1.write.end"
  t "$1.read.start"; dd if="$d/big" of=/dev/null bs=1M 2>/dev/null; t "$1.read.end"
  rm "$d/big"
  mkdir "$d/tree"
  t "$1.untar.start"; tar xf "$3" -C "$d/tree"; sync; t "$1.untar.end"
  t "$1.find.start"; n=$(find "$d/tree" | wc -l); t "$1.find.end"
  echo "N $1 $n"
}
cp "$BIND/tree.tar" "$ROOT/tree.tar"
place rootfs "$ROOT" "$ROOT/tree.tar"
place bind "$BIND" "$BIND/tree.tar"
"""


def build_tree(path: Path, files: int) -> None:
    """A tarball of `files` files of 0-4 KiB in directories of 100 (deterministic)."""
    rng = random.Random(14)
    with tarfile.open(path, "w") as tar:
        for index in range(files):
            data = rng.randbytes(rng.randrange(0, 4097))
            info = tarfile.TarInfo(f"d{index // FILES_PER_DIRECTORY:04d}/f{index:06d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))


def tree_entries(files: int) -> int:
    """What `find` prints for the unpacked tree: itself, its directories, the files."""
    return 1 + -(-files // FILES_PER_DIRECTORY) + files


def parse(output: str) -> dict[str, float]:
    marks: dict[str, float] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "T":
            marks[parts[1]] = float(parts[2])
    return {
        f"{place}.{work}": marks[f"{place}.{work}.end"] - marks[f"{place}.{work}.start"]
        for place in PLACES
        for work in WORKLOADS
        if f"{place}.{work}.end" in marks
    }


def wrapper_shims(directory: Path, dirs: HarpoonDirs) -> dict[str, str]:
    """A shim per harpoon variant, running this checkout's harpoon with the variant's
    environment and the bench's guest and templates; returns runtime names by variant."""
    return {
        variant: wrapper_shim(
            directory,
            variant.replace("-", ""),
            {
                **dirs.environment(),
                TEMPLATES_ENV: "on" if how.templates else "off",
                SHARE_FS_ENV: how.share_fs,
                CACHE_ENV: how.virtiofs_cache,
            },
        )
        for variant, how in HARPOON_VARIANTS.items()
    }


def run_host(scratch: Path, bind: Path, mib: int) -> tuple[str, str | None]:
    """The script on the host; its output and why it failed (None: it did not)."""
    root = scratch / "host-root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    env = {"PATH": "/usr/bin:/bin", "MIB": str(mib), "ROOT": str(root), "BIND": str(bind)}
    out = subprocess.run(
        ["busybox", "sh", "-c", SCRIPT], env=env, capture_output=True, text=True, check=False
    )
    shutil.rmtree(root, ignore_errors=True)
    failure = None if out.returncode == 0 else f"status {out.returncode}: {out.stderr[-400:]}"
    return out.stdout, failure


@dataclass
class Measured:
    """Everything one run measured (the JSON's body)."""

    samples: dict[str, dict[str, list[float]]]
    failures: dict[str, list[str]] = field(default_factory=dict)
    entries: dict[str, str] = field(default_factory=dict)
    #: Per harpoon variant, how each of its measured containers' VMs started.
    starts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Per runtime, the machine's 1-minute load average before and after each run: the
    #: other sessions' share of the 2 cores, which rounds do not see alike.
    load: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def record(self, name: str, output: str, failure: str | None, expected: int) -> str:
        """Keeps one run's figures and says them (or why the run does not count)."""
        figures = parse(output)
        for line in output.splitlines():
            if line.startswith("N "):
                _, place, count = line.split()
                self.entries[f"{name} {place}"] = count
                if int(count) != expected:
                    failure = failure or f"{place}: find saw {count} entries, not {expected}"
        if failure is None and len(figures) != len(PLACES) * len(WORKLOADS):
            failure = f"only {sorted(figures)} timed: {output[-400:]}"
        if failure is not None:
            self.failures.setdefault(name, []).append(failure)
        for key, seconds in figures.items():
            self.samples[name].setdefault(key, []).append(seconds)
        return f"{figures}" + (f"; {failure}" if failure else "")


@dataclass
class ShareBench:
    """The rounds: each runtime in turn, on a bind directory of its own."""

    args: argparse.Namespace
    scratch: Path
    tarball: Path
    daemon: Containerd
    image: str
    runtimes: dict[str, str]

    async def measure(self) -> Measured:
        ctr, shim_log = Ctr(self.daemon), ShimLog(self.daemon.log_path)
        expected = tree_entries(self.args.files)
        measured = Measured({name: {} for name in self.args.only})
        for round_ in range(self.args.runs):
            for name in self.args.only:
                bind = self.scratch / f"bind-{name}-{round_}"
                bind.mkdir()
                shutil.copy(self.tarball, bind / "tree.tar")
                began, load_before = time.monotonic(), os.getloadavg()[0]
                say(f"round {round_ + 1}/{self.args.runs}: {name} ({time.strftime('%H:%M:%S')})")
                if name == "host":
                    host = asyncio.to_thread(run_host, self.scratch, bind, self.args.mib)
                    output, failure = await host
                else:
                    container_id = f"share-{name}-{round_}-{os.getpid()}"
                    output, failure = await self._run_container(ctr, name, container_id, bind)
                    if name in HARPOON_VARIANTS:
                        start = await shim_log.start(container_id)
                        starts = measured.starts.setdefault(name, [])
                        starts.append({"id": container_id, **asdict(start)})
                        say(f"  VM: {_describe(start)}")
                measured.load.setdefault(name, []).append((load_before, os.getloadavg()[0]))
                said = measured.record(name, output, failure, expected)
                say(f"  {time.monotonic() - began:.0f} s: {said}")
                shutil.rmtree(bind, ignore_errors=True)
        return measured

    async def _run_container(
        self, ctr: Ctr, name: str, container_id: str, bind: Path
    ) -> tuple[str, str | None]:
        """The script in a container of runtime `name`, the bind directory at /bind."""
        script = f"MIB={self.args.mib} ROOT=/hp-root BIND=/bind\nmkdir -p /hp-root\n{SCRIPT}"
        ran = await ctr.run_container(
            self.runtimes[name], self.image, container_id, "sh", "-c", script,
            timeout_s=RUN_TIMEOUT_BASE_S + RUN_TIMEOUT_PER_FILE_S * self.args.files,
            options=("--mount", f"type=bind,src={bind},dst=/bind,options=rbind:rw"),
        )  # fmt: skip
        return ran.stdout.decode(errors="replace"), None if ran.ok else ran.failure()


def _describe(start: VMStart) -> str:
    said = START_LABELS.get(start.mode or "", "start unknown (no log line)")
    if start.seconds is not None:
        said += f" in {start.seconds:.2f} s"
    return said + (f" ({start.cold_reason})" if start.cold_reason else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.share", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="size of the sequential file")
    parser.add_argument(
        "--files", type=int, default=None, help=f"files in the tarball (default {DEFAULT_FILES})"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a smaller run: {QUICK_FILES} files (unless --files)"
    )
    parser.add_argument("--runs", type=int, default=1, help="rounds (all runtimes each)")
    parser.add_argument("--containerd", default="2.3")
    parser.add_argument(
        "--only",
        nargs="*",
        default=DEFAULT_RUNTIMES,
        choices=["host", "runc", *HARPOON_VARIANTS],
        help="runtimes",
    )
    parser.add_argument("--table", type=Path, help="print the table of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.files is None:
        args.files = QUICK_FILES if args.quick else DEFAULT_FILES
    started = time.monotonic()
    began_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="hp-share-bench-", dir="/var/tmp") as scratch_dir:
        scratch = Path(scratch_dir)
        variants = [HARPOON_VARIANTS[name] for name in args.only if name in HARPOON_VARIANTS]
        say("building the bench's guest image (and VM template)")
        dirs = prepare_harpoon(scratch, template=any(v.restores for v in variants))
        say(f"  {dirs.built}")
        shims = scratch / "shims"
        shims.mkdir()
        runtimes = {"runc": "io.containerd.runc.v2", **wrapper_shims(shims, dirs)}
        tarball = scratch / "tree.tar"
        build_tree(tarball, args.files)
        say(f"tarball: {args.files} files, {tarball.stat().st_size >> 20} MiB")
        # Debug: containerd copies the shims' log lines (VM starts) into its log.
        with Containerd(args.containerd, path_prepend=[shims], log_level="debug") as daemon:
            image = daemon.import_image(build_busybox_image(default_cache_dir()))
            bench = ShareBench(args, scratch, tarball, daemon, image, runtimes)
            measured = asyncio.run(bench.measure())
    record = {
        "args": {key: str(value) if isinstance(value, Path) else value
                 for key, value in vars(args).items()},
        "began": began_utc,
        "built": dirs.built,
        **asdict(measured),
        "seconds": time.monotonic() - started,
    }  # fmt: skip
    print(table(record))
    print(f"\nentries found: {measured.entries}")
    if measured.failures:
        print(f"\nfailures: {json.dumps(measured.failures, indent=1)}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"share-{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


def table(record: dict[str, Any]) -> str:
    """The markdown table of a run's record (the JSON); its last rows say how harpoon's
    VMs started (records made before those were kept have none)."""
    saved, samples = record["args"], record["samples"]
    mib, files, runs = saved["mib"], saved["files"], saved["runs"]
    starts: dict[str, list[dict[str, Any]]] = record.get("starts", {})
    names = list(samples)
    # Time ratio of the two shares in each round (interleaved: the same machine load).
    compared = "harpoon-virtiofs" in samples and "harpoon-9p" in samples
    extra = " virtiofs ÷ 9p time, per round |" if compared else ""
    lines = [
        f"{mib} MiB sequential, {files} files; median of {runs} run(s); "
        f"whole run {record['seconds']:.0f} s",
        "",
        "| where | workload | " + " | ".join(names) + " |" + extra,
        "|---|---|" + "---:|" * len(names) + ("---|" if compared else ""),
    ]
    for place in PLACES:
        for work in WORKLOADS:
            cells = [_cell(samples[name].get(f"{place}.{work}"), work, mib) for name in names]
            if compared:
                pairs = zip(
                    samples["harpoon-virtiofs"].get(f"{place}.{work}", []),
                    samples["harpoon-9p"].get(f"{place}.{work}", []),
                    strict=False,
                )
                ratios = sorted(
                    max(v, UPTIME_RESOLUTION_S) / max(n, UPTIME_RESOLUTION_S) for v, n in pairs
                )
                cells.append(" ".join(f"{r:.2f}" for r in ratios) or "n/a")
            lines.append(f"| {place} | {work} | " + " | ".join(cells) + " |")
    if starts:
        restored = [_restored_cell(starts.get(name)) for name in names]
        seconds = [_start_cell(starts.get(name)) for name in names]
        tail = " |" if compared else ""
        lines.append("| VM | restored from a template | " + " | ".join(restored) + " |" + tail)
        lines.append("| VM | start → agent ready | " + " | ".join(seconds) + " |" + tail)
        reasons = {
            f"{name}: {start['cold_reason']}"
            for name in names
            for start in starts.get(name, [])
            if start["mode"] == "cold" and start.get("cold_reason")
        }
        if reasons:
            lines += ["", "Cold boots, as the shims' plans said: " + "; ".join(sorted(reasons))]
    if load := record.get("load"):
        per_runtime = (
            f"{name} " + ", ".join(f"{before:.1f} → {after:.1f}" for before, after in load[name])
            for name in names
        )
        lines += ["", "Load average (1 min) before → after each run: " + "; ".join(per_runtime)]
    return "\n".join(lines)


def _cell(values: list[float] | None, work: str, mib: int) -> str:
    if not values:
        return "n/a"
    seconds = median(values)
    if work in ("write", "read"):
        # Below /proc/uptime's 10 ms: a bound, not a figure.
        rate = mib / max(seconds, UPTIME_RESOLUTION_S)
        return f"{rate:.0f} MiB/s" if seconds > 0 else f"> {rate:.0f} MiB/s"
    return f"{seconds:.2f} s" if seconds > 0 else "< 0.01 s"


def _restored_cell(starts: list[dict[str, Any]] | None) -> str:
    """ "R of N" VMs restored (N: the runs whose start the log told)."""
    if starts is None:
        return "-"
    known = [s for s in starts if s["mode"] is not None]
    cell = f"{sum(s['mode'] == 'template' for s in known)} of {len(known)}"
    unknown = len(starts) - len(known)
    return cell + (f" ({unknown} unknown)" if unknown else "")


def _start_cell(starts: list[dict[str, Any]] | None) -> str:
    """Median VM start, per way of starting."""
    if starts is None:
        return "-"
    parts = []
    for mode, label in START_LABELS.items():
        seconds = [s["seconds"] for s in starts if s["mode"] == mode]
        if seconds:
            parts.append(f"{median(seconds):.2f} s {label}")
    return ", ".join(parts) or "n/a"


if __name__ == "__main__":
    sys.exit(main())
