"""Where the pinned containerd builds the test harness drives live, and how to build them.

A *flavour* is one containerd release line we test against ("1.6", "2.3"). Each has a
pinned version and a directory holding `containerd`, `ctr` and the runc shim. Debian's
1.6 comes from apt; the 2.x lines are built from source with `go install` into a cache
directory once per machine (`python -m harpoon.devenv.tools install`, run by
scripts/install-deps). Adding a release line is one entry in `FLAVOURS`.

This module never starts a daemon; `harpoon.devenv.containerd` does that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

#: Root of the per-machine cache of source-built tools (overridable for unprivileged use).
TOOLS_CACHE_DIR = Path(os.environ.get("HARPOON_TOOLS_DIR", "/var/cache/harpoon/tools"))

#: The binaries every flavour must provide.
CONTAINERD_BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")

#: Build tags for `go install`: btrfs headers are not installed and we never use btrfs.
GO_BUILD_TAGS = "no_btrfs"

#: Name of the shim console script that containerd must find on its PATH.
HARPOON_SHIM_BINARY = "containerd-shim-harpoon-v1"


@dataclass(frozen=True)
class Flavour:
    """One containerd release line: its pinned version and where its binaries are."""

    name: str
    version: str
    bin_dir: Path
    #: Config schema the release reads natively enough for our keys (2 for 1.x, 3 for 2.x).
    config_version: int
    #: Go module to build from, or None when the binaries come from a distro package.
    go_module: str | None = None

    def binary(self, name: str) -> Path:
        """Path of one of this flavour's binaries (it may not exist yet)."""
        return self.bin_dir / name

    @property
    def containerd(self) -> Path:
        return self.binary("containerd")

    @property
    def ctr(self) -> Path:
        return self.binary("ctr")

    def missing_binaries(self) -> list[Path]:
        """The binaries of this flavour that are not installed as executables."""
        return [
            path
            for path in (self.binary(name) for name in CONTAINERD_BINARIES)
            if not os.access(path, os.X_OK)
        ]

    def install_hint(self) -> str:
        """What to run to get this flavour's binaries."""
        if self.go_module is None:
            return "run scripts/install-deps (apt-get install containerd runc)"
        return f"run scripts/install-deps (builds {self.go_module}@v{self.version})"


def _source_flavour(name: str, version: str) -> Flavour:
    return Flavour(
        name=name,
        version=version,
        bin_dir=TOOLS_CACHE_DIR / f"containerd-v{version}",
        config_version=3,
        go_module="github.com/containerd/containerd/v2",
    )


FLAVOURS: dict[str, Flavour] = {
    # Debian 12's package; /usr/sbin/runc is found on PATH by its runc shim.
    "1.6": Flavour(name="1.6", version="1.6.20", bin_dir=Path("/usr/bin"), config_version=2),
    # 2.3 changed the shim start-up protocol (BootstrapParams on stdin).
    "2.3": _source_flavour("2.3", "2.3.7"),
}

#: The flavours the e2e tests run against by default.
DEFAULT_FLAVOURS = ("1.6", "2.3")


def flavour(name: str) -> Flavour:
    """The flavour called `name`, or a KeyError that lists the known ones."""
    try:
        return FLAVOURS[name]
    except KeyError:
        raise KeyError(f"unknown containerd flavour {name!r}; known: {sorted(FLAVOURS)}") from None


def in_ci() -> bool:
    """True under CI (`CI=true`), where a missing prerequisite is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def scripts_dir() -> Path:
    """The directory holding this Python's console scripts (containerd-shim-harpoon-v1).

    Taken from the running interpreter, not from PATH: under pyenv, PATH holds wrapper
    shims that re-resolve the interpreter from the environment, which containerd
    (started with a different environment) should not depend on.
    """
    return Path(sysconfig.get_path("scripts"))


def installed_shim() -> Path | None:
    """This Python's containerd-shim-harpoon-v1 (see scripts_dir), else the one on PATH."""
    beside = scripts_dir() / HARPOON_SHIM_BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(HARPOON_SHIM_BINARY)
    return Path(found) if found else None


def go_binary() -> Path | None:
    """The `go` toolchain: on PATH, else the official tarball's default location."""
    found = shutil.which("go")
    if found:
        return Path(found)
    fallback = Path("/usr/local/go/bin/go")
    return fallback if os.access(fallback, os.X_OK) else None


def build_flavour(f: Flavour) -> None:
    """Builds a source flavour's binaries into its bin_dir with `go install`."""
    if f.go_module is None:
        raise ValueError(f"containerd {f.name} is not built from source: {f.install_hint()}")
    go = go_binary()
    if go is None:
        raise RuntimeError(
            f"building containerd {f.version} needs Go: install it to /usr/local/go or PATH"
        )
    f.bin_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOBIN=str(f.bin_dir))
    targets = [f"{f.go_module}/cmd/{name}@v{f.version}" for name in CONTAINERD_BINARIES]
    # flush: go's own output goes straight to the shared stdout and would overtake ours.
    print(f"+ GOBIN={f.bin_dir} {go} install -tags {GO_BUILD_TAGS} {' '.join(targets)}", flush=True)
    subprocess.run([str(go), "install", "-tags", GO_BUILD_TAGS, *targets], env=env, check=True)


def install_missing(names: list[str]) -> int:
    """Builds every named source flavour whose binaries are missing; returns an exit code."""
    failed = False
    for name in names:
        f = flavour(name)
        missing = f.missing_binaries()
        if not missing:
            print(f"containerd {f.name}: v{f.version} present in {f.bin_dir}")
            continue
        if f.go_module is None:
            listed = ", ".join(map(str, missing))
            print(f"containerd {f.name}: missing {listed}; {f.install_hint()}")
            failed = True
            continue
        started = time.monotonic()
        build_flavour(f)
        print(f"containerd {f.name}: built v{f.version} in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harpoon.devenv.tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="build missing source-built containerd flavours")
    install.add_argument("flavours", nargs="*", default=list(FLAVOURS))
    sub.add_parser("list", help="print each flavour, its version and binary directory")
    args = parser.parse_args(argv)
    if args.command == "install":
        return install_missing(args.flavours)
    for f in FLAVOURS.values():
        state = "missing" if f.missing_binaries() else "ok"
        print(f"{f.name}\tv{f.version}\t{f.bin_dir}\t{state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
