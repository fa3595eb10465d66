"""9p vs virtiofs, side by side in one run: file I/O on a container's rootfs and on a
bind mount, under harpoon with each share, under runc, and on the host itself.

    python -m bench.share [--mib 256] [--files 20000] [--runs 1]

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
rootfs, bind mount), `harpoon-9p` and `harpoon-virtiofs` (each a shim started with
HARPOON_SHARE_FS set: a wrapper shim of its own name, `containerd-shim-<name>-v1`;
both boot cold, templates off, as a virtiofs VM always does, which changes nothing in
the figures: only the workload is timed). Prints a markdown table and writes JSON to
bench/results/share-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from statistics import median

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.images import build_busybox_image, default_cache_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORKLOADS = ("write", "read", "untar", "find")
PLACES = ("rootfs", "bind")
#: variant: (HARPOON_SHARE_FS, HARPOON_VIRTIOFS_CACHE)
HARPOON_VARIANTS = {
    "harpoon-9p": ("9p", ""),
    "harpoon-virtiofs": ("virtiofs", ""),
    # virtiofsd --cache=auto (names and attributes cached 1 s): only with --only.
    "harpoon-virtiofs-auto": ("virtiofs", "auto"),
}
DEFAULT_RUNTIMES = ["host", "runc", "harpoon-9p", "harpoon-virtiofs"]
RUN_TIMEOUT_S = 3600.0
UPTIME_RESOLUTION_S = 0.01

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
            info = tarfile.TarInfo(f"d{index // 100:04d}/f{index:06d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))


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


def wrapper_shims(directory: Path) -> dict[str, str]:
    """A shim per harpoon variant (HARPOON_SHARE_FS set), running this checkout's
    harpoon; returns runtime names by variant."""
    runtimes = {}
    for variant, (fs, cache) in HARPOON_VARIANTS.items():
        name = variant.replace("-", "")
        script = directory / f"containerd-shim-{name}-v1"
        script.write_text(
            "#!/bin/sh\n"
            f"export PYTHONPATH={REPO / 'src'} HARPOON_SHARE_FS={fs} HARPOON_TEMPLATES=off\n"
            f"export HARPOON_VIRTIOFS_CACHE={cache}\n"
            f"exec {sys.executable} -c 'from harpoon.shim.cli import main; main()' \"$@\"\n"
        )
        script.chmod(0o755)
        runtimes[variant] = f"io.containerd.{name}.v1"
    return runtimes


def run_host(scratch: Path, bind: Path, mib: int) -> subprocess.CompletedProcess[str]:
    root = scratch / "host-root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    env = {"PATH": "/usr/bin:/bin", "MIB": str(mib), "ROOT": str(root), "BIND": str(bind)}
    return subprocess.run(
        ["busybox", "sh", "-c", SCRIPT], env=env, capture_output=True, text=True, check=False
    )


def run_container(
    daemon: Containerd, runtime: str, image: str, bind: Path, mib: int, name: str
) -> subprocess.CompletedProcess[str]:
    script = f"MIB={mib} ROOT=/hp-root BIND=/bind\nmkdir -p /hp-root\n{SCRIPT}"
    return daemon.ctr(
        "run", "--rm", "--runtime", runtime,
        "--mount", f"type=bind,src={bind},dst=/bind,options=rbind:rw",
        image, name, "sh", "-c", script,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.share", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="size of the sequential file")
    parser.add_argument("--files", type=int, default=20000, help="files in the tarball")
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
        record = json.loads(args.table.read_text())
        saved = record["args"]
        runs, mib, files = saved["runs"], saved["mib"], saved["files"]
        print(table(record["samples"], mib, files, runs, record["seconds"]))
        return 0
    started = time.monotonic()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in args.only}
    failures: dict[str, list[str]] = {}
    counts: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="hp-share-bench-", dir="/var/tmp") as scratch_dir:
        scratch = Path(scratch_dir)
        shims = scratch / "shims"
        shims.mkdir()
        runtimes = {"runc": "io.containerd.runc.v2", **wrapper_shims(shims)}
        tarball = scratch / "tree.tar"
        build_tree(tarball, args.files)
        print(f"tarball: {args.files} files, {tarball.stat().st_size >> 20} MiB", file=sys.stderr)
        with Containerd(args.containerd, path_prepend=[shims]) as daemon:
            image = daemon.import_image(build_busybox_image(default_cache_dir()))
            for round_ in range(args.runs):
                for name in args.only:
                    bind = scratch / f"bind-{name}-{round_}"
                    bind.mkdir()
                    shutil.copy(tarball, bind / "tree.tar")
                    print(f"round {round_ + 1}: {name}", file=sys.stderr, flush=True)
                    if name == "host":
                        result = run_host(scratch, bind, args.mib)
                    else:
                        result = run_container(
                            daemon, runtimes[name], image, bind, args.mib,
                            f"share-{name}-{round_}-{os.getpid()}",
                        )  # fmt: skip
                    figures = parse(result.stdout)
                    if result.returncode != 0 or len(figures) != len(PLACES) * len(WORKLOADS):
                        tail = (result.stderr or result.stdout)[-400:]
                        failures.setdefault(name, []).append(f"status {result.returncode}: {tail}")
                    for key, seconds in figures.items():
                        samples[name].setdefault(key, []).append(seconds)
                    for line in result.stdout.splitlines():
                        if line.startswith("N "):
                            counts[f"{name} {line.split()[1]}"] = line.split()[2]
                    print(f"  {figures}", file=sys.stderr, flush=True)
                    shutil.rmtree(bind, ignore_errors=True)
    took = time.monotonic() - started
    print(table(samples, args.mib, args.files, args.runs, took))
    print(f"\nentries found: {counts}")
    if failures:
        print(f"\nfailures: {json.dumps(failures, indent=1)}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record = {
        "args": vars(args),
        "samples": samples,
        "failures": failures,
        "entries": counts,
        "seconds": took,
    }
    (RESULTS / f"share-{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


def table(
    samples: dict[str, dict[str, list[float]]], mib: int, files: int, runs: int, took: float
) -> str:
    names = list(samples)
    # Time ratio of the two shares in each round (interleaved: the same machine load).
    compared = "harpoon-virtiofs" in samples and "harpoon-9p" in samples
    extra = " virtiofs ÷ 9p time, per round |" if compared else ""
    lines = [
        f"{mib} MiB sequential, {files} files; median of {runs} run(s); whole run {took:.0f} s",
        "",
        "| where | workload | " + " | ".join(names) + " |" + extra,
        "|---|---|" + "---:|" * len(names) + ("---|" if compared else ""),
    ]
    for place in PLACES:
        for work in WORKLOADS:
            cells = []
            for name in names:
                values = samples[name].get(f"{place}.{work}")
                if not values:
                    cells.append("n/a")
                    continue
                seconds = median(values)
                if work in ("write", "read"):
                    # Below /proc/uptime's 10 ms: a bound, not a figure.
                    rate = mib / max(seconds, UPTIME_RESOLUTION_S)
                    cells.append(f"{rate:.0f} MiB/s" if seconds > 0 else f"> {rate:.0f} MiB/s")
                else:
                    cells.append(f"{seconds:.2f} s" if seconds > 0 else "< 0.01 s")
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
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
