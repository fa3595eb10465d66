"""Where the pinned tools the test harness drives live, and how to build them.

A *flavour* is one containerd release line we test against ("1.6", "2.3"). Each has a
pinned version and a directory holding `containerd`, `ctr` and the runc shim. Debian's
1.6 comes from apt; the 2.x lines are built from source with `go install` into a cache
directory once per machine (`python -m harpoon.devenv.tools install`, run by
scripts/install-deps). Adding a release line is one entry in `FLAVOURS`.

containerd's shim conformance suite (`SHIMTEST`), nerdctl (`NERDCTL`), gvproxy
(`GVPROXY`, the user-mode network of harpoon.net.gvproxy) and BuildKit's buildkitd and
buildctl (`BUILDKIT`) are built the same way, once
per machine, but from the source tarballs kept in `../shared/third_party` beside the
repository (the Go module proxy refuses the first two; their Go dependencies come from
it, gvproxy's are vendored in its tarball): pinned by their sha256, built in a scratch
directory (that one is read-only), cached under a name made of those hashes
(`SourceBuild`). Adding such a tool is a `SourceBuild` subclass (its commands and the
files it keeps) and one entry in `SOURCE_BUILDS`.

virtiofsd (`CRATES`), the host side of virtiofs shares, is a Rust crate: `cargo install
--locked` of a pinned version from crates.io with the machine's Rust, into the same cache
(`CrateBuild`; ~7 min on 2 shared cores, measured; it links libseccomp and libcap-ng,
Debian packages that install-deps installs). So is vhost-device-vsock, the guest vsock
of the vfkit test double (harpoon.devenv.vfkit_double): pure Rust, ~1 min (measured:
52 s with rustc 1.95 on 2 cores).

This module never starts a daemon or a test; `harpoon.devenv.containerd` starts
containerd, tests/conformance runs shimtest, tests/e2e/nerdctl.py runs nerdctl.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harpoon import dirs
from harpoon.guest import sources as guest_sources
from harpoon.vmm import virtiofsd

#: Root of the per-machine cache of source-built tools (overridable for unprivileged use).
TOOLS_CACHE_DIR = Path(dirs.tools_dir())

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

#: Where the third-party source tarballs are: `shared/third_party` beside the repository
#: (src/harpoon/devenv/ is three levels below it), unless HARPOON_THIRD_PARTY_DIR says.
THIRD_PARTY_DIR = Path(
    os.environ.get("HARPOON_THIRD_PARTY_DIR")
    or Path(__file__).resolve().parents[3].parent / "shared" / "third_party"
)

#: Go's names of the machines `platform.machine()` names differently.
GO_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}

#: One step of a source build (a `make build`, a `go build` and its Go dependencies);
#: on 2 cores: shimtest ~30 s, nerdctl ~110 s cold. This only catches a hung step.
SOURCE_BUILD_STEP_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class SourceTarball:
    """A `git archive` tarball of a pinned upstream commit, checked by its sha256."""

    file_name: str
    sha256: str
    #: The one directory the tarball unpacks into.
    directory_name: str

    def verified(self, third_party: Path) -> Path:
        """The tarball's path in `third_party`, once its content is the pinned one."""
        path = third_party / self.file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the third-party sources are expected in {third_party} "
                "(shared/third_party beside the repository; HARPOON_THIRD_PARTY_DIR moves it)"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != self.sha256:
            raise ValueError(
                f"{path} has sha256 {digest}, not the pinned {self.sha256}: update the pin in "
                "harpoon.devenv.tools with the tarball, never one without the other"
            )
        return path


@dataclass(frozen=True)
class SourceBuild:
    """A tool built from tarballs of `THIRD_PARTY_DIR` (`build_source`): `source` and any
    `beside` it unpacked side by side in a scratch directory, `commands` run in `source`'s
    tree, and the files named by `outputs` copied into a cache directory named after the
    tarballs' hashes. A subclass says which commands and files."""

    #: The tool's name on install-deps' command line and in `list`.
    name: str
    #: The tarball whose tree is built.
    source: SourceTarball
    #: Other tarballs the build needs, unpacked beside `source`'s directory.
    beside: tuple[SourceTarball, ...] = ()

    @property
    def cache_dir(self) -> Path:
        """Named after the tarballs' hashes and the recipe (commands, environment):
        another pin or another way of building it is another directory."""
        recipe = [
            *(tarball.sha256 for tarball in (self.source, *self.beside)),
            repr(self.commands(Path("go"))),
            repr(sorted(self.environment().items())),
        ]
        digest = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]
        return TOOLS_CACHE_DIR / f"{self.name}-{digest}"

    def outputs(self) -> dict[str, str]:
        """Each file the build leaves in the cache directory -> its path in the tree."""
        raise NotImplementedError

    def commands(self, go: Path) -> list[list[str]]:
        """The build, run in `source`'s unpacked tree with `go`'s directory on PATH."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Variables the build's commands need besides the caller's environment."""
        return {}

    def missing_binaries(self) -> list[Path]:
        """The files of this tool that are not in its cache directory as executables."""
        return [
            path
            for path in (self.cache_dir / name for name in self.outputs())
            if not os.access(path, os.X_OK)
        ]

    def install_hint(self) -> str:
        return f"run scripts/install-deps (builds {self.name} from {self.source.file_name})"

    @property
    def pin(self) -> str:
        """What is built, in words (install's messages, `list`)."""
        return self.source.file_name


@dataclass(frozen=True)
class Shimtest(SourceBuild):
    """containerd/shimtest's test binary and the test binary it puts in its rootfs,
    built with `make build` from its tarball and the ttrpc commit its go.mod pins
    (which the module proxy refuses: `go mod edit -replace` points it at the tarball)."""

    @property
    def binary(self) -> Path:
        """`shimtest.test`: a Go test binary (`-test.v`, `-shimtest.config=…`)."""
        return self.cache_dir / "shimtest.test"

    @property
    def testbin(self) -> Path:
        """The multicall binary of the test rootfs (shimtest's SHIMTEST_TESTBIN): without
        it, and not run from its source tree, shimtest tries to download one."""
        return self.cache_dir / "testbin"

    def outputs(self) -> dict[str, str]:
        return {self.binary.name: "_output/shimtest.test", self.testbin.name: "testdata/testbin"}

    def commands(self, go: Path) -> list[list[str]]:
        (ttrpc,) = self.beside
        replace = f"github.com/containerd/ttrpc=../{ttrpc.directory_name}"
        # testbin runs in the container: the host's architecture (the Makefile says amd64).
        goarch = GO_ARCHITECTURES.get(platform.machine(), platform.machine())
        # testbin's `forever`, the init of most cases, exits on *any* signal it is sent
        # (signal.Notify with no list), and that includes the SIGURG the Go runtime sends
        # its own threads to preempt a goroutine (golang/go#37942: Notify cannot tell
        # them apart). A goroutine is preempted after 10 ms on CPU, and a VM's vCPU
        # descheduled by a busy host makes any instant look that long to the guest: ~1
        # exec in 60 saw its container's init "exit 0" in CI. Seen in the guest as
        # "ended by urgent I/O condition" (a testbin that names the signal, its VM
        # stopped for 10-40 ms at random); so testbin is built with asynchronous
        # preemption off (runtime.godebugDefault, as `//go:debug` would set it), for
        # both profiles. A signal anyone else sends still ends `forever`.
        no_preemption_signals = "-s -w -X=runtime.godebugDefault=asyncpreemptoff=1"
        return [
            [str(go), "mod", "edit", "-replace", replace],
            ["make", "build", f"GO={go}", f"TESTBIN_GOARCH={goarch}"],
            [
                "env", "CGO_ENABLED=0", "GOOS=linux", f"GOARCH={goarch}",
                str(go), "build", "-ldflags", no_preemption_signals,
                "-o", "testdata/testbin", "./cmd/testbin",
            ],
        ]  # fmt: skip


@dataclass(frozen=True)
class StaticGoBinary(SourceBuild):
    """A tool that is one static binary, `go build ./cmd/<name>` with cgo off, as its
    release is built."""

    @property
    def binary(self) -> Path:
        return self.cache_dir / self.name

    def outputs(self) -> dict[str, str]:
        return {self.name: f"_output/{self.name}"}

    def go_build(self, go: Path, *flags: str) -> list[str]:
        return [str(go), "build", *flags, "-o", f"_output/{self.name}", f"./cmd/{self.name}"]

    def environment(self) -> dict[str, str]:
        return {"CGO_ENABLED": "0"}


@dataclass(frozen=True, kw_only=True)
class Nerdctl(StaticGoBinary):
    """containerd/nerdctl, its version stamped in by -ldflags as its release's is; its Go
    dependencies come from the Go module proxy."""

    #: The version nerdctl reports (`nerdctl version`), as its release build stamps it.
    version: str

    def commands(self, go: Path) -> list[list[str]]:
        stamp = f"-X github.com/containerd/nerdctl/v2/pkg/version.Version=v{self.version}"
        return [self.go_build(go, "-ldflags", stamp)]


@dataclass(frozen=True)
class Gvproxy(StaticGoBinary):
    """containers/gvisor-tap-vsock's gvproxy, the user-mode network a VM's virtio-net
    NIC plugs into (harpoon.net.gvproxy), built from the tarball's vendored modules (no
    module proxy). It reports the version `git archive` stamped into the tarball."""

    def commands(self, go: Path) -> list[list[str]]:
        # -mod=vendor is go's default when there is a vendor directory; said here, a
        # vendor tree that does not match go.mod fails the build instead of a download.
        return [self.go_build(go, "-mod=vendor")]


@dataclass(frozen=True, kw_only=True)
class BuildKit(SourceBuild):
    """moby/buildkit's buildkitd and buildctl, static (cgo off), built from the tarball's
    vendored modules, their version and commit stamped in as its release's are."""

    #: The version `buildkitd --version` reports, and the commit of the tarball.
    version: str
    revision: str

    @property
    def buildkitd(self) -> Path:
        return self.cache_dir / "buildkitd"

    @property
    def buildctl(self) -> Path:
        return self.cache_dir / "buildctl"

    def outputs(self) -> dict[str, str]:
        return {"buildkitd": "_output/buildkitd", "buildctl": "_output/buildctl"}

    def commands(self, go: Path) -> list[list[str]]:
        package = "github.com/moby/buildkit"
        stamp = (
            f"-X {package}/version.Version=v{self.version} "
            f"-X {package}/version.Revision={self.revision} "
            f"-X {package}/version.Package={package}"
        )
        # One `go build` of both: they share most packages, built once.
        return [
            [
                str(go), "build", "-mod=vendor", "-ldflags", stamp,
                "-o", "_output/", "./cmd/buildkitd", "./cmd/buildctl",
            ]
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return {"CGO_ENABLED": "0"}


SHIMTEST = Shimtest(
    name="shimtest",
    source=SourceTarball(
        "shimtest-f2937b6.tar.gz",
        "fa32ffbfffc36fe9aa35b454786e8e6afda7effa07137382ba1952d1bed4f5d9",
        "shimtest",
    ),
    beside=(
        SourceTarball(
            "ttrpc-6c2eed2.tar.gz",
            "ee2584fa81239f633125cc3561de66c6808e36e07ab9e1f2543930a514b264da",
            "ttrpc",
        ),
    ),
)

#: nerdctl 2.3 talks to containerd 1.7 and later only.
NERDCTL = Nerdctl(
    name="nerdctl",
    source=SourceTarball(
        "nerdctl-v2.3.5.tar.gz",
        "f633227c934b5e45aecb8333e611dfbaaeb48f1e51e4ab4fe3817ef735bf3f7e",
        "nerdctl-v2.3.5",
    ),
    version="2.3.5",
)

#: gvproxy v0.8.9 serves one VM per process (`-listen-qemu` accepts once): one per VM.
GVPROXY = Gvproxy(
    name="gvproxy",
    source=SourceTarball(
        "gvisor-tap-vsock-v0.8.9.tar.gz",
        "67ca338beaa79ac7c3658dd70c29bc15e800c69d6eeb32f35889d2f200c4b696",
        "gvisor-tap-vsock-v0.8.9",
    ),
)

#: buildkitd's containerd worker runs each build step as a container of the harpoon
#: runtime (harpoon.devenv.buildkitd, the front door's build service).
BUILDKIT = BuildKit(
    name="buildkit",
    source=SourceTarball(
        "buildkit-v0.32.2.tar.gz",
        "1bbd3503ea33447d3b9db63842e4b44473d996d4d9211253b14ea4bccb3047aa",
        "buildkit-v0.32.2",
    ),
    version="0.32.2",
    revision="991535e0973488b6a429096d21fa13f81f2d89d8",
)

#: Where the machine's apt sources are: a Debian source package is fetched from the
#: mirror they name (`debian_mirror`).
APT_SOURCES = guest_sources.APT_SOURCES

#: The mirror used when the machine's apt sources name no Debian archive.
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"


def debian_mirror(sources: tuple[Path, ...] = APT_SOURCES, codename: str | None = None) -> str:
    """The Debian archive the machine's apt sources use (harpoon.guest.sources reads
    them): the first URI of a `deb` entry for the machine's own release (`codename`, from
    /etc/os-release), else `DEFAULT_DEBIAN_MIRROR`."""
    codename = codename or _os_codename()
    for entry in guest_sources.host_sources(sources):
        if codename in entry.suites:
            return entry.uri.rstrip("/")
    return DEFAULT_DEBIAN_MIRROR


def _os_codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "bookworm"
    match = re.search(r"^VERSION_CODENAME=\"?([\w-]+)", text, re.MULTILINE)
    return match.group(1) if match else "bookworm"


@dataclass(frozen=True)
class DebianSourceBuild:
    """A tool built from a Debian source package of a newer release than the machine's
    (`suite`), pinned by version and by its .dsc's sha256: `apt-get source` with a
    private apt configuration (a `deb-src` entry on the machine's own mirror, its own
    lists directory: the machine's apt sources are not changed, and no binary package
    of that release is ever installed), `commands` run in the unpacked tree, `outputs`
    copied into a cache directory named after the version and that hash. The build's
    dependencies are the machine's own packages (scripts/install-deps installs them)."""

    name: str
    #: The source package, its Debian version and the sha256 of its .dsc.
    package: str
    version: str
    dsc_sha256: str
    suite: str
    #: Each file the build leaves in the cache directory -> its path in the tree.
    outputs: tuple[tuple[str, str], ...]
    commands: tuple[tuple[str, ...], ...]

    @property
    def cache_dir(self) -> Path:
        return TOOLS_CACHE_DIR / f"{self.name}-{self.version}-{self.dsc_sha256[:16]}"

    def binary(self, name: str) -> Path:
        return self.cache_dir / name

    def missing_binaries(self) -> list[Path]:
        return [
            path
            for path in (self.cache_dir / name for name, _ in self.outputs)
            if not os.access(path, os.X_OK)
        ]

    def install_hint(self) -> str:
        return f"run scripts/install-deps (builds {self.package} {self.version} from source)"

    @property
    def pin(self) -> str:
        return f"{self.package} {self.version}"

    def build(self) -> None:
        """Fetches, checks and builds the source package in a scratch directory, then moves
        the outputs into the cache directory in one rename."""
        TOOLS_CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"harpoon-{self.name}-build-") as scratch:
            work = Path(scratch)
            lists = work / "lists"
            (lists / "partial").mkdir(parents=True)
            sources = work / "sources.list"
            sources.write_text(f"deb-src {debian_mirror()} {self.suite} main\n")
            apt = [
                "apt-get", "-q",
                "-o", f"Dir::Etc::SourceList={sources}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={lists}",
                # The scratch directory is root's: _apt could not write into it.
                "-o", "APT::Sandbox::User=root",
            ]  # fmt: skip
            env = dict(os.environ)
            _run_step([*apt, "update"], work, env)
            wanted = f"{self.package}={self.version}"
            uris = subprocess.run(
                [*apt, "source", "--print-uris", wanted],
                cwd=work, env=env, check=True, capture_output=True, text=True,
                timeout=SOURCE_BUILD_STEP_TIMEOUT_S,
            ).stdout  # fmt: skip
            dsc = f"{self.package}_{self.version.split(':')[-1]}.dsc"
            if f" {dsc} " not in uris or f"SHA256:{self.dsc_sha256}" not in uris:
                raise ValueError(
                    f"{self.suite}'s {dsc} is not the pinned one (sha256 {self.dsc_sha256}); "
                    f"apt offers:\n{uris}update the pin in harpoon.devenv.tools"
                )
            _run_step([*apt, "source", wanted], work, env)
            (tree,) = [p for p in work.iterdir() if p.is_dir() and p.name != "lists"]
            for command in self.commands:
                _run_step(list(command), tree, env)
            staged = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=TOOLS_CACHE_DIR))
            for name, built in self.outputs:
                shutil.copy2(tree / built, staged / name)
            staged.chmod(0o755)
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            staged.rename(self.cache_dir)


#: erofs-utils with `mkfs.erofs --tar`, which containerd's erofs differ needs (bookworm's
#: 1.5 lacks it): trixie's source package, built against bookworm's libraries.
EROFS_UTILS = DebianSourceBuild(
    name="erofs-utils",
    package="erofs-utils",
    version="1.8.6-1",
    dsc_sha256="283a75530916f03fb443a7d7f80f9c3487647f070c071ff10a8187448b17af55",
    suite="trixie",
    outputs=(("mkfs.erofs", "mkfs/mkfs.erofs"), ("fsck.erofs", "fsck/fsck.erofs")),
    commands=(
        ("./autogen.sh",),
        ("./configure", "--disable-fuse"),
        ("make", f"-j{os.cpu_count() or 1}"),
    ),
)

#: The tools built from Debian source packages, by name.
DEBIAN_SOURCE_BUILDS: dict[str, DebianSourceBuild] = {EROFS_UTILS.name: EROFS_UTILS}

#: The tools built from THIRD_PARTY_DIR, by name.
SOURCE_BUILDS: dict[str, SourceBuild] = {
    tool.name: tool for tool in (SHIMTEST, NERDCTL, GVPROXY, BUILDKIT)
}


@dataclass(frozen=True)
class CrateBuild:
    """A binary of a crates.io crate at a pinned version, `cargo install --locked` into
    a scratch root and moved into TOOLS_CACHE_DIR/<name>-v<version>/ in one rename."""

    name: str
    version: str

    @property
    def cache_dir(self) -> Path:
        return TOOLS_CACHE_DIR / f"{self.name}-v{self.version}"

    @property
    def binary(self) -> Path:
        return self.cache_dir / self.name

    def missing_binaries(self) -> list[Path]:
        return [] if os.access(self.binary, os.X_OK) else [self.binary]

    @property
    def pin(self) -> str:
        return f"v{self.version}"


#: virtiofsd's pin lives beside its use (harpoon.vmm.virtiofsd), which finds it here.
VIRTIOFSD = CrateBuild("virtiofsd", virtiofsd.VERSION)
#: rust-vmm's vhost-user vsock device: the guest vsock of the vfkit test double
#: (harpoon.devenv.vfkit_double), reached from the host through a unix socket and the
#: Firecracker hybrid-vsock handshake. Pure Rust (no system library to link).
VHOST_DEVICE_VSOCK = CrateBuild("vhost-device-vsock", "0.3.0")
CRATES: dict[str, CrateBuild] = {tool.name: tool for tool in (VIRTIOFSD, VHOST_DEVICE_VSOCK)}


def cargo_binary() -> Path | None:
    """`cargo`: on PATH, else rustup's default place for root."""
    found = shutil.which("cargo")
    if found:
        return Path(found)
    fallback = Path.home() / ".cargo/bin/cargo"  # HOME, else the password database's
    return fallback if os.access(fallback, os.X_OK) else None


def install_crate(tool: CrateBuild) -> int:
    """Builds `tool` unless its cache directory holds it; returns an exit code."""
    return _install(tool, lambda: _cargo_install(tool))


def _cargo_install(tool: CrateBuild) -> None:
    cargo = cargo_binary()
    if cargo is None:
        raise RuntimeError("no cargo on PATH (install Rust)")
    TOOLS_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"harpoon-{tool.name}-build-") as scratch:
        root = Path(scratch) / "root"
        env = dict(os.environ, CARGO_TARGET_DIR=str(Path(scratch) / "target"))
        argv = [str(cargo), "install", tool.name, "--version", tool.version, "--locked"]
        _run_step([*argv, "--root", str(root)], Path(scratch), env)
        staged = Path(tempfile.mkdtemp(prefix=f".{tool.name}-", dir=TOOLS_CACHE_DIR))
        shutil.copy2(root / "bin" / tool.name, staged / tool.name)
        staged.chmod(0o755)
        shutil.rmtree(tool.cache_dir, ignore_errors=True)
        staged.rename(tool.cache_dir)


def _install(tool: SourceBuild | DebianSourceBuild | CrateBuild, build: Callable[[], None]) -> int:
    """Runs `build` unless the tool's cache directory holds it; returns an exit code."""
    if not tool.missing_binaries():
        print(f"{tool.name}: {tool.pin} present in {tool.cache_dir}")
        return 0
    started = time.monotonic()
    try:
        build()
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as error:
        print(f"{tool.name}: not built: {error}")
        return 1
    took_s = time.monotonic() - started
    print(f"{tool.name}: built {tool.pin} in {took_s:.0f} s: {tool.cache_dir}")
    return 0


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


def build_source(tool: SourceBuild, third_party: Path) -> None:
    """Builds `tool` from its verified tarballs in a scratch directory (the tarballs'
    directory is read-only), then moves its files into its cache directory in one rename
    (a half-built cache cannot be mistaken for a built one)."""
    go = go_binary()
    if go is None:
        raise RuntimeError(f"building {tool.name} needs Go: install it to /usr/local/go or PATH")
    tarballs = [tarball.verified(third_party) for tarball in (tool.source, *tool.beside)]
    env = dict(
        os.environ,
        PATH=f"{go.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **tool.environment(),
    )
    TOOLS_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"harpoon-{tool.name}-build-") as scratch:
        work = Path(scratch)
        for tarball in tarballs:
            _run_step(["tar", "xzf", str(tarball), "-C", str(work)], work, env)
        tree = work / tool.source.directory_name
        for command in tool.commands(go):
            _run_step(command, tree, env, tool.environment())
        staged = Path(tempfile.mkdtemp(prefix=f".{tool.name}-", dir=TOOLS_CACHE_DIR))
        for name, built in tool.outputs().items():
            shutil.copy2(tree / built, staged / name)
        staged.chmod(0o755)
        # A directory missing a binary is an interrupted copy of an older layout: replace it.
        shutil.rmtree(tool.cache_dir, ignore_errors=True)
        staged.rename(tool.cache_dir)


def _run_step(
    argv: list[str], cwd: Path, env: dict[str, str], shown: dict[str, str] | None = None
) -> None:
    assignments = "".join(f"{name}={value} " for name, value in (shown or {}).items())
    # flush: the step's own output goes straight to the shared stdout and would overtake ours.
    print(f"+ (cd {cwd} && {assignments}{shlex.join(argv)})", flush=True)
    subprocess.run(argv, cwd=cwd, env=env, check=True, timeout=SOURCE_BUILD_STEP_TIMEOUT_S)


def install_source_build(tool: SourceBuild, third_party: Path) -> int:
    """Builds `tool` unless its cache directory holds it; returns an exit code."""
    return _install(tool, lambda: build_source(tool, third_party))


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


def install_debian_source_build(tool: DebianSourceBuild) -> int:
    """Builds `tool` unless its cache directory holds it; returns an exit code."""
    return _install(tool, tool.build)


def install_tools(names: list[str], third_party: Path) -> int:
    """Builds what is missing of the named tools: non-zero if any build failed."""
    status = install_missing([name for name in names if name in FLAVOURS])
    for name in names:
        if name in SOURCE_BUILDS:
            status = install_source_build(SOURCE_BUILDS[name], third_party) or status
        if name in DEBIAN_SOURCE_BUILDS:
            status = install_debian_source_build(DEBIAN_SOURCE_BUILDS[name]) or status
        if name in CRATES:
            status = install_crate(CRATES[name]) or status
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harpoon.devenv.tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    built = " and ".join(SOURCE_BUILDS)
    install = sub.add_parser(
        "install", help=f"build what is missing of the source-built containerd flavours, {built}"
    )
    known = [*FLAVOURS, *SOURCE_BUILDS, *DEBIAN_SOURCE_BUILDS, *CRATES]
    install.add_argument("tools", nargs="*", help=f"any of {' '.join(known)} (default: all)")
    install.add_argument(
        "--third-party",
        type=Path,
        default=THIRD_PARTY_DIR,
        help=f"directory of the source tarballs {built} are built from (default {THIRD_PARTY_DIR})",
    )
    sub.add_parser("list", help=f"print each flavour, {built}: version and directory")
    args = parser.parse_args(argv)
    if args.command == "install":
        unknown = sorted(set(args.tools) - set(known))
        if unknown:
            parser.error(f"unknown tools {unknown}; known: {known}")
        return install_tools(args.tools or known, args.third_party)
    for f in FLAVOURS.values():
        state = "missing" if f.missing_binaries() else "ok"
        print(f"{f.name}\tv{f.version}\t{f.bin_dir}\t{state}")
    built_tools: list[SourceBuild | DebianSourceBuild | CrateBuild] = [
        *SOURCE_BUILDS.values(),
        *DEBIAN_SOURCE_BUILDS.values(),
        *CRATES.values(),
    ]
    for tool in built_tools:
        state = "missing" if tool.missing_binaries() else "ok"
        print(f"{tool.name}\t{tool.pin}\t{tool.cache_dir}\t{state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
