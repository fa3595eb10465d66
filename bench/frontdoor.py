"""The front door, side by side with runc on the same services: what a user of
`harpoon run` and `harpoon compose` waits for.

    python -m bench.frontdoor [--runs 5 | --quick] [--only run compose]
    python -m bench.frontdoor --table bench/results/frontdoor-<stamp>.json

One `harpoon system start` on a root of the bench's own (HARPOON_ROOT in /tmp: its
containerd, nerdctl state, CNI network), with this checkout's harpoon and a guest image
and VM templates of the bench's own (bench/checkout.py). The busybox and Debian test
images go in with `harpoon load`. Figures, each under harpoon (the front door's
default) and runc (`--runtime io.containerd.runc.v2`, or compose's `runtime:`),
interleaved per round, the runtime that goes first alternating:

- **run**: `harpoon run --rm busybox true`, wall time of the whole command (harpoon's
  CLI, nerdctl, containerd, the container's start and end; the VM's too).
- **compose**: `harpoon compose up -d` of tests/e2e/compose_app (nginx, a Python app,
  a Python store; every service in its own VM under harpoon) until the app's first
  answer 200 on its published port, which needs all three running; `down -v` after
  (not timed).
- **build**: `harpoon build --no-cache` of a Dockerfile of three RUN steps on busybox,
  the image loaded into harpoon's namespace: on harpoon's buildkitd (every step in a
  VM) and, for runc, on a second buildkitd of the bench's whose worker runs runc, on the
  same containerd (`--buildkit-host`; its own namespace, the busybox image imported).

One unmeasured round first (a cold VM builds its template then). Every address is the
loopback or the bench's own network (a /24 of 10.231.0.0/16 that no host route uses).
Leaves nothing: `harpoon system stop`, then the root is removed; what still named the
root is listed (`leftovers`, empty on a clean run). Prints a markdown table; writes JSON
to bench/results/frontdoor-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import machine
from bench.checkout import REPO, prepare_harpoon
from bench.report import exit_on_sigterm, print_and_save, say
from bench.stats import quantile
from bench.tcp import free_port
from harpoon import dirs
from harpoon.devenv.cni import a_free_subnet, bridge_named, forget
from harpoon.devenv.debian_image import DEBIAN_WEB_REF, build_debian_image
from harpoon.devenv.images import BUSYBOX_REF, build_busybox_image, default_cache_dir

COMPOSE_APP = REPO / "tests" / "e2e" / "compose_app"
RUNC = "io.containerd.runc.v2"
RUNTIMES = ("runc", "harpoon")
FIGURES = {
    "run": "`harpoon run --rm busybox true`",
    "compose": "compose up → first answer",
    "build": "3-step `harpoon build --no-cache`",
}
#: The build figure's Dockerfile: three RUN steps, each a container (a VM under harpoon).
DOCKERFILE = f"""FROM {BUSYBOX_REF}
RUN echo one > /one
RUN echo two > /two
RUN cat /one /two > /both
"""
#: The runc baseline's buildkitd: its own namespace on harpoon's containerd.
RUNC_BUILD_NAMESPACE = "bench-runc-build"
DEFAULT_RUNS, QUICK_RUNS = 5, 2
COMMAND_TIMEOUT_S = 300.0
ANSWER_TIMEOUT_S = 180.0
POLL_INTERVAL_S = 0.05


class FrontDoor:
    """`harpoon` of this checkout on the bench's root."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = {**os.environ, **env, dirs.ROOT_ENV: str(root)}
        self.env.pop(dirs.RUN_DIR_ENV, None)

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "harpoon.cli", *args], env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT_S, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-600:]
            raise RuntimeError(f"harpoon {' '.join(args[:3])}: status {done.returncode}: {tail}")


def runtime_args(runtime: str) -> list[str]:
    return [] if runtime == "harpoon" else ["--runtime", RUNC]


def time_run(harpoon: FrontDoor, runtime: str) -> float:
    began = time.monotonic()
    harpoon("run", "--rm", "--pull", "never", *runtime_args(runtime), BUSYBOX_REF, "true")
    return time.monotonic() - began


def _answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def time_compose(harpoon: FrontDoor, runtime: str, scratch: Path, subnet: str) -> float:
    project = scratch / f"app{time.monotonic_ns() % 10**9}"
    shutil.copytree(COMPOSE_APP, project)
    port = free_port()
    env = {"HPT_IMAGE": DEBIAN_WEB_REF, "HPT_RUNTIME": "" if runtime == "harpoon" else RUNC,
           "HPT_PORT": str(port), "HPT_SUBNET": subnet}  # fmt: skip
    compose_file = str(project / "compose.yaml")
    began = time.monotonic()
    try:
        harpoon("compose", "-f", compose_file, "up", "-d", env=env)
        while not _answers(port):
            if time.monotonic() - began > ANSWER_TIMEOUT_S:
                raise RuntimeError(f"no answer 200 on 127.0.0.1:{port}")
            time.sleep(POLL_INTERVAL_S)
        return time.monotonic() - began
    finally:
        network = f"{project.name}_default"
        bridge = bridge_named(harpoon.root / "lib" / "cni" / "net.d", network)
        harpoon("compose", "-f", compose_file, "down", "-v", env=env)
        if bridge:  # what compose's down leaves of its network (harpoon.devenv.cni)
            forget(network, bridge)
        shutil.rmtree(project, ignore_errors=True)


class RuncBuilder:
    """A buildkitd whose steps run under runc, on harpoon's containerd (the build
    figure's baseline)."""

    def __init__(self, root: Path, scratch: Path) -> None:
        from harpoon.buildkit.config import BuildkitdLayout, BuildkitdSettings
        from harpoon.system.config import find_buildkit

        binaries = find_buildkit()
        if isinstance(binaries, str):
            raise RuntimeError(binaries)
        self.binaries = binaries
        self.containerd = root / "run" / "containerd" / "containerd.sock"
        self.layout = BuildkitdLayout(scratch / "runc-buildkit", root / "rb")
        self.settings = BuildkitdSettings(
            containerd_address=self.containerd, namespace=RUNC_BUILD_NAMESPACE, runtime=RUNC
        )
        self.log = scratch / "runc-buildkitd.log"

    def start(self, image_tar: Path) -> None:
        from harpoon.buildkit.daemon import start_buildkitd
        from harpoon.devenv.tools import FLAVOURS

        subprocess.run(
            [str(FLAVOURS["2.3"].ctr), "--address", str(self.containerd), "--namespace",
             RUNC_BUILD_NAMESPACE, "images", "import", "--local", str(image_tar)],
            check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S,
        )  # fmt: skip
        start_buildkitd(self.binaries, self.settings, self.layout, self.log)

    def stop(self) -> None:
        from harpoon.buildkit.daemon import stop_buildkitd

        stop_buildkitd(self.layout)

    @property
    def address(self) -> str:
        return self.layout.address


def time_build(harpoon: FrontDoor, runtime: str, context: Path, runc: RuncBuilder) -> float:
    where = [] if runtime == "harpoon" else ["--buildkit-host", runc.address]
    began = time.monotonic()
    harpoon("build", "--no-cache", "--progress", "plain", *where,
            "-t", f"bench/build:{runtime}", str(context))  # fmt: skip
    return time.monotonic() - began


def leftovers(root: Path) -> list[str]:
    """Processes, mounts and sockets that still name the root."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit() and int(pid_dir.name) != os.getpid():
            try:
                argv = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(root) in argv:
                found.append(f"process {pid_dir.name}: {argv[:160]}")
    with open("/proc/self/mounts") as mounts:
        found += [f"mount {line.split()[1]}" for line in mounts if str(root) in line]
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    exit_on_sigterm()
    started = time.monotonic()
    began_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    samples: dict[str, dict[str, list[float]]] = {f: {r: [] for r in RUNTIMES} for f in args.only}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hp-fd-bench-", dir="/var/tmp") as scratch_dir:
        scratch = Path(scratch_dir)
        say("building the bench's guest image and VM templates")
        built = prepare_harpoon(scratch, template=True)
        root = Path(tempfile.mkdtemp(prefix="hpfb-", dir="/tmp"))  # short: sun_path
        harpoon = FrontDoor(root, built.environment())
        subnet = str(a_free_subnet())
        left: list[str] = []
        runc_builder: RuncBuilder | None = None
        try:
            say(f"harpoon system start on {root}")
            harpoon("system", "start")
            harpoon("load", "-i", str(build_busybox_image(default_cache_dir())))
            if "compose" in args.only:
                harpoon("load", "-i", str(build_debian_image(default_cache_dir())))
            context = scratch / "build"
            context.mkdir()
            (context / "Dockerfile").write_text(DOCKERFILE)
            builder = RuncBuilder(root, scratch)
            if "build" in args.only:
                runc_builder = builder
                builder.start(build_busybox_image(default_cache_dir()))
            measures: dict[str, Callable[[str], float]] = {
                "run": lambda runtime: time_run(harpoon, runtime),
                "compose": lambda runtime: time_compose(harpoon, runtime, scratch, subnet),
                "build": lambda runtime: time_build(harpoon, runtime, context, builder),
            }
            for round_number in range(args.runs + 1):
                order = RUNTIMES if round_number % 2 else RUNTIMES[::-1]
                for figure in args.only:
                    for runtime in order:
                        try:
                            took = measures[figure](runtime)
                        except (RuntimeError, subprocess.TimeoutExpired) as error:
                            failures.append(f"{figure} {runtime}: {error}")
                            continue
                        if round_number:  # the first round warms up
                            samples[figure][runtime].append(took)
                say(f"round {round_number} of {args.runs} done")
        finally:
            if runc_builder is not None:
                runc_builder.stop()
            try:
                harpoon("system", "stop")
            except RuntimeError as error:
                failures.append(f"system stop: {error}")
            left = leftovers(root)
            shutil.rmtree(root, ignore_errors=True)
    return {
        "args": vars(args), "began": began_utc, "machine": machine.describe(REPO),
        "built": built.built, "samples": samples, "failures": failures, "leftovers": left,
        "seconds": time.monotonic() - started,
    }  # fmt: skip


def table(record: dict[str, Any]) -> str:
    described = record.get("machine", {})
    lines = [
        f"{record['began']}: {record['args']['runs']} round(s), median (p95) seconds; "
        f"{described.get('nproc')} cores, {described.get('accelerator')}; "
        f"whole run {record['seconds']:.0f} s",
        "",
        "| figure | runc | harpoon | harpoon ÷ runc |",
        "|---|---:|---:|---:|",
    ]
    for figure, by_runtime in record["samples"].items():
        cells, medians = [], []
        for runtime in RUNTIMES:
            values = by_runtime[runtime]
            medians.append(quantile(values, 0.5) if values else None)
            cells.append(
                f"{quantile(values, 0.5):.2f} ({quantile(values, 0.95):.2f})" if values else "n/a"
            )
        runc, ours = medians
        ratio = f"{ours / runc:.1f}" if runc and ours is not None else "n/a"
        lines.append(f"| {FIGURES[figure]} | {cells[0]} | {cells[1]} | {ratio} |")
    if record["failures"]:
        lines += ["", f"Failed runs: {len(record['failures'])} (the JSON says why)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontdoor", description=__doc__)
    parser.add_argument("--runs", type=int, default=None, help=f"rounds ({DEFAULT_RUNS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} rounds")
    parser.add_argument("--only", nargs="*", default=list(FIGURES), choices=list(FIGURES))
    parser.add_argument("--table", type=Path, help="print the table of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    args.runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    record = run(args)
    print_and_save("frontdoor", table(record), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
