"""`python -m harpoon.devenv run -- CMD…`: one container in a throw-away containerd.

The demo and the manual check: starts a pinned containerd with its state in a temporary
directory, imports the busybox test image, runs `ctr run --rm` with the chosen runtime
(harpoon by default), prints the container's output and exits with its status, then
stops containerd and removes everything. Needs root.
"""

from __future__ import annotations

import argparse
import sys
import time

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.images import build_busybox_image, default_cache_dir
from harpoon.devenv.tools import DEFAULT_FLAVOURS, FLAVOURS, scripts_dir

HARPOON_RUNTIME = "io.containerd.harpoon.v1"
#: A demo container gets this long before ctr is killed.
RUN_TIMEOUT_S = 300.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harpoon.devenv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one busybox container and print its output")
    run.add_argument("--containerd", choices=sorted(FLAVOURS), default=DEFAULT_FLAVOURS[0])
    run.add_argument("--runtime", default=HARPOON_RUNTIME, help=f"default {HARPOON_RUNTIME}")
    run.add_argument("argv", nargs="+", help="the command to run in the container")
    args = parser.parse_args(argv)

    started = time.monotonic()
    with Containerd(args.containerd, path_prepend=[scripts_dir()]) as daemon:
        image = daemon.import_image(build_busybox_image(default_cache_dir()))
        ready = time.monotonic()
        result = daemon.ctr(
            "run", "--rm", "--runtime", args.runtime, image, "demo", *args.argv,
            timeout=RUN_TIMEOUT_S, check=False,
        )  # fmt: skip
        ran = time.monotonic()
        version = daemon.version
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    print(
        f"[containerd {version} + image: {ready - started:.2f} s, "
        f"ctr run {args.runtime}: {ran - ready:.2f} s, exit status {result.returncode}]",
        file=sys.stderr,
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
