"""`harpoon doctor` on macOS: the pieces a Mac needs beyond the guest and the shim.

A Mac runs harpoon under a containerd built for darwin from source (releases ship
none): 2.2 or later, where the erofs snapshotter and differ are darwin's defaults
(containerd defaults/defaults_darwin.go) and unpack an image with no mount at all: the
differ turns each layer into an erofs image with the host's `mkfs.erofs --tar`, and
the mount manager formats each container's writable layer with the host's `mkfs.ext4`
(macos-facts.md §3). So doctor checks, each with its fix:

- the VMM of the chosen backend (harpoon.vmm.backend.default_backend);
- containerd >= 2.2 (`containerd --version`);
- its config (the file named by --containerd-config / $HARPOON_CONTAINERD_CONFIG, else
  the first of CONFIG_CANDIDATES that exists; none at all is containerd's defaults,
  plus the imports it names): the erofs snapshotter and differ not disabled, nothing
  unpacking or running harpoon's containers with another snapshotter, and on 2.2 the
  differ's `mkfs_options = ['-b4096']` (2.3 adds it itself: erofsutils
  AddDefaultMkfsOpts; without it the guest's kernel refuses 16K blocks, nerdbox #55);
- `mkfs.erofs` (with --tar) and `mkfs.ext4` on containerd's PATH ($HARPOON_CONTAINERD_PATH
  when containerd runs with another PATH than doctor's; else doctor's, plus containerd's
  directory): Homebrew's e2fsprogs is keg-only, so its mkfs.ext4 is on no PATH until
  one names its sbin;
- gvproxy: every container's network on a Mac is harpoon's user-mode one (there are no
  network namespaces to put a VM in).

Everything the checks look at goes through a MacHost, which tests replace.
"""

from __future__ import annotations

import functools
import glob
import itertools
import os
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon.devenv.nerdctl import version_tuple
from harpoon.system.doctor import Check, Finding, vmm_finding

if TYPE_CHECKING:
    from harpoon.vmm.backend import HostVMM

MINIMUM_CONTAINERD = (2, 2)
#: From this version on containerd passes -b4096 to mkfs.erofs itself.
DEFAULT_BLOCK_SIZE_CONTAINERD = (2, 3)
BLOCK_SIZE_OPTION = "-b4096"
CONFIG_ENV = "HARPOON_CONTAINERD_CONFIG"
PATH_ENV = "HARPOON_CONTAINERD_PATH"
CONTAINERD_ENV = "HARPOON_CONTAINERD"
#: containerd's own default (defaults/defaults_unix.go), then Homebrew's etc/ on Apple
#: silicon and on Intel, where a Homebrew-prefixed install keeps it.
CONFIG_CANDIDATES = (
    Path("/etc/containerd/config.toml"),
    Path("/opt/homebrew/etc/containerd/config.toml"),
    Path("/usr/local/etc/containerd/config.toml"),
)
#: Homebrew's keg-only e2fsprogs (Apple silicon, Intel): linked onto no PATH.
E2FSPROGS_SBINS = (Path("/opt/homebrew/opt/e2fsprogs/sbin"), Path("/usr/local/opt/e2fsprogs/sbin"))
SNAPSHOTTER_PLUGIN = "io.containerd.snapshotter.v1.erofs"
DIFFER_PLUGIN = "io.containerd.differ.v1.erofs"
TRANSFER_PLUGIN = "io.containerd.transfer.v1.local"
CRI_RUNTIME_PLUGIN = "io.containerd.cri.v1.runtime"
CRI_IMAGES_PLUGIN = "io.containerd.cri.v1.images"
RUNTIME = "io.containerd.harpoon.v1"
EROFS = "erofs"
BUILD_CONTAINERD = (
    "build containerd 2.2 or later for darwin from source (README.md, On a Mac: "
    "`make binaries` in a containerd checkout, then install bin/containerd and bin/ctr)"
)
VERSION_TIMEOUT_S = 10.0


class MacHost:
    """What the macOS checks look at: this Mac's files, programs and environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def which(self, program: str, path: str | None = None) -> str | None:
        return shutil.which(program, path=path)

    def output(self, argv: list[str]) -> str | None:
        """What argv prints (stdout and stderr), whatever its status; None if it
        cannot run."""
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout + done.stderr

    def read_text(self, path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None

    def glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(pattern))

    def is_file(self, path: Path) -> bool:
        return path.is_file()

    def vmm(self) -> HostVMM:
        from harpoon.vmm.backend import default_backend

        return default_backend().host_vmm()

    def gvproxy(self) -> str | None:
        from harpoon.net import gvproxy

        return gvproxy.find()


@dataclass(frozen=True)
class Containerd:
    path: str
    version: str


@dataclass(frozen=True)
class Config:
    """containerd's config as doctor read it: where from, and its merged settings."""

    path: Path | None
    settings: dict[str, Any]
    error: str | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "no config file (containerd's defaults)"

    def plugin(self, name: str) -> dict[str, Any]:
        plugins = self.settings.get("plugins")
        section = plugins.get(name) if isinstance(plugins, dict) else None
        return section if isinstance(section, dict) else {}

    def disabled(self, name: str) -> bool:
        return name in (self.settings.get("disabled_plugins") or [])


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class MacChecks:
    """The macOS checks, over one MacHost (what they look at is read once)."""

    def __init__(self, host: MacHost, config_path: Path | None = None) -> None:
        self.host = host
        self.config_path = config_path

    # -- what they look at --------------------------------------------------------------

    @functools.cached_property
    def containerd(self) -> Containerd | str:
        """containerd ($HARPOON_CONTAINERD, else PATH's) and its version, or why not."""
        binary = self.host.environ.get(CONTAINERD_ENV) or self.host.which("containerd")
        if not binary:
            return f"no containerd (${CONTAINERD_ENV} or on PATH)"
        printed = self.host.output([binary, "--version"])
        words = (printed or "").split()
        if len(words) < 3 or not version_tuple(words[2].removeprefix("v")):
            return f"{binary} does not say its version (`containerd --version`)"
        return Containerd(binary, words[2].removeprefix("v"))

    @functools.cached_property
    def config(self) -> Config:
        named = self.config_path or self.host.environ.get(CONFIG_ENV)
        path = Path(named) if named else None
        if path is None:
            path = next((p for p in CONFIG_CANDIDATES if self.host.is_file(p)), None)
            if path is None:
                return Config(None, {})
        return self._load(path)

    def _load(self, path: Path) -> Config:
        text = self.host.read_text(path)
        if text is None:
            return Config(path, {}, f"cannot read {path}")
        try:
            main = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            return Config(path, {}, f"{path} is not TOML: {error}")
        # Imported files first, the main file over them (relative imports: beside it).
        settings: dict[str, Any] = {}
        for pattern in main.get("imports") or []:
            for name in self.host.glob(str(path.parent / pattern)):
                imported = self.host.read_text(Path(name))
                try:
                    settings = _merge(settings, tomllib.loads(imported or ""))
                except tomllib.TOMLDecodeError as error:
                    return Config(path, {}, f"{name} (imported by {path}) is not TOML: {error}")
        return Config(path, _merge(settings, main))

    def containerd_path(self) -> str:
        named = self.host.environ.get(PATH_ENV)
        if named:
            return named
        path = self.host.environ.get("PATH", "")
        found = self.containerd
        if isinstance(found, Containerd):
            path = f"{path}:{Path(found.path).parent}" if path else str(Path(found.path).parent)
        return path

    def _path_words(self) -> str:
        return f"${PATH_ENV}" if self.host.environ.get(PATH_ENV) else "doctor's PATH"

    # -- the probes -----------------------------------------------------------------------

    def probe_vmm(self) -> Finding:
        return vmm_finding(self.host.vmm())

    def vmm_fix(self) -> str:
        return self.host.vmm().install_hint

    def probe_containerd(self) -> Finding:
        found = self.containerd
        if isinstance(found, str):
            return Finding(False, found)
        if version_tuple(found.version) < MINIMUM_CONTAINERD:
            minimum = ".".join(map(str, MINIMUM_CONTAINERD))
            return Finding(
                False,
                f"{found.path} is containerd {found.version}: a Mac needs {minimum} or later "
                "(the erofs snapshotter and differ)",
            )
        return Finding(True, f"containerd {found.version} at {found.path}")

    def probe_snapshotter(self) -> Finding:
        config = self.config
        if config.error:
            return Finding(False, config.error)
        problems = []
        if config.disabled(SNAPSHOTTER_PLUGIN):
            problems.append(f"disabled_plugins has {SNAPSHOTTER_PLUGIN}")
        problems += [f"{what} uses the {name} snapshotter" for what, name in self._snapshotters()]
        if problems:
            return Finding(False, f"{config.where}: {'; '.join(problems)}")
        return Finding(True, f"erofs ({config.where})")

    def _snapshotters(self) -> list[tuple[str, str]]:
        """Where the config names a snapshotter that is not erofs, for harpoon's images
        or containers: the transfer service's unpack platforms, CRI's images, and a
        CRI runtime of harpoon's."""
        named: list[tuple[str, str]] = []
        for entry in self.config.plugin(TRANSFER_PLUGIN).get("unpack_config") or []:
            if isinstance(entry, dict) and entry.get("snapshotter", EROFS) != EROFS:
                named.append((f"unpack_config {entry.get('platform', '')}", entry["snapshotter"]))
        images = self.config.plugin(CRI_IMAGES_PLUGIN).get("snapshotter")
        if images and images != EROFS:
            named.append((CRI_IMAGES_PLUGIN, str(images)))
        runtimes = self.config.plugin(CRI_RUNTIME_PLUGIN).get("containerd", {}).get("runtimes", {})
        for name, runtime in (runtimes or {}).items():
            if not isinstance(runtime, dict) or runtime.get("runtime_type") != RUNTIME:
                continue
            if runtime.get("snapshotter", EROFS) != EROFS:
                named.append((f"runtime {name}", str(runtime["snapshotter"])))
        return named

    def snapshotter_fix(self) -> str:
        where = self.config.path or CONFIG_CANDIDATES[0]
        return (
            f"in {where}: take {SNAPSHOTTER_PLUGIN} out of disabled_plugins and name "
            "snapshotter = 'erofs' where another is named (or drop that setting: erofs is "
            "darwin's default); restart containerd"
        )

    def probe_differ(self) -> Finding:
        config = self.config
        if config.error:
            return Finding(False, config.error)
        if config.disabled(DIFFER_PLUGIN):
            return Finding(False, f"{config.where}: disabled_plugins has {DIFFER_PLUGIN}")
        options = [str(o) for o in config.plugin(DIFFER_PLUGIN).get("mkfs_options") or []]
        block = BLOCK_SIZE_OPTION in options or any(
            a == "-b" and b == "4096" for a, b in itertools.pairwise(options)
        )
        found = self.containerd
        defaults_block = (
            isinstance(found, Containerd)
            and version_tuple(found.version) >= DEFAULT_BLOCK_SIZE_CONTAINERD
        )
        if block or defaults_block:
            said = f"mkfs_options {options}" if block else "-b4096 by containerd's default"
            return Finding(True, f"erofs, {said} ({config.where})")
        version = found.version if isinstance(found, Containerd) else "of unknown version"
        return Finding(
            False,
            f"{config.where}: containerd {version} makes 16K-block erofs layers the guest "
            f"refuses without [plugins.'{DIFFER_PLUGIN}'] mkfs_options = ['{BLOCK_SIZE_OPTION}']",
        )

    def differ_fix(self) -> str:
        where = self.config.path or CONFIG_CANDIDATES[0]
        return (
            f"add to {where}: [plugins.'{DIFFER_PLUGIN}'] mkfs_options = ['{BLOCK_SIZE_OPTION}'] "
            f"(and take it out of disabled_plugins); restart containerd"
        )

    def probe_mkfs_erofs(self) -> Finding:
        found = self.host.which("mkfs.erofs", path=self.containerd_path())
        if found is None:
            return Finding(False, f"no mkfs.erofs on containerd's PATH ({self._path_words()})")
        if "--tar" not in (self.host.output([found, "--help"]) or ""):
            return Finding(False, f"{found} has no --tar (erofs-utils 1.7 or later has)")
        return Finding(True, found)

    def probe_mkfs_ext4(self) -> Finding:
        found = self.host.which("mkfs.ext4", path=self.containerd_path())
        if found is not None:
            return Finding(True, found)
        for sbin in E2FSPROGS_SBINS:
            if self.host.is_file(sbin / "mkfs.ext4"):
                return Finding(
                    False,
                    f"{sbin / 'mkfs.ext4'} is not on containerd's PATH ({self._path_words()}): "
                    "Homebrew's e2fsprogs is keg-only",
                )
        return Finding(False, f"no mkfs.ext4 on containerd's PATH ({self._path_words()})")

    def probe_gvproxy(self) -> Finding:
        found = self.host.gvproxy()
        if found is None:
            return Finding(False, "no gvproxy (every container's network on a Mac)")
        return Finding(True, found)

    def checks(self) -> tuple[Check, ...]:
        keg = " or ".join(str(sbin) for sbin in E2FSPROGS_SBINS)
        return (
            Check("VMM", True, self.probe_vmm, self.vmm_fix),
            Check("containerd", True, self.probe_containerd, BUILD_CONTAINERD),
            Check("erofs snapshotter", True, self.probe_snapshotter, self.snapshotter_fix),
            Check("erofs differ", True, self.probe_differ, self.differ_fix),
            Check("mkfs.erofs", True, self.probe_mkfs_erofs,
                  "brew install erofs-utils (and have its bin on containerd's PATH)"),
            Check("mkfs.ext4", True, self.probe_mkfs_ext4,
                  f"brew install e2fsprogs, then add its keg-only sbin ({keg}) to "
                  f"containerd's PATH (its launchd plist's EnvironmentVariables; doctor reads "
                  f"${PATH_ENV})"),
            Check("gvproxy", True, self.probe_gvproxy,
                  "brew install podman (its gvproxy), or name one in $HARPOON_GVPROXY"),
        )  # fmt: skip
