"""Which containerd and nerdctl harpoon's services run, and the files they read.

containerd: $HARPOON_CONTAINERD (a `containerd` binary) if set; else the pinned 2.3
that scripts/install-deps builds (harpoon.devenv.tools); else a `containerd` on PATH
of 1.7 or later (nerdctl 2.3 needs 1.7). Its `ctr` and `containerd-shim-runc-v2` are
taken from the same directory. nerdctl: $HARPOON_NERDCTL, else the pinned build, else
PATH's. buildkitd and buildctl: $HARPOON_BUILDKITD (a `buildkitd`, its `buildctl` beside
it), else the pinned build, else PATH's pair. The CNI plugins: $HARPOON_CNI_PATH, else
the first of CNI_PLUGIN_DIRS that has a `bridge` plugin. Each `find_*` returns None (or
a reason) rather than raising: `harpoon doctor` reports what is missing, the services
refuse to start without it.

The rendered files: containerd's config (harpoon.devenv.containerd.render_config: state
under the layout, the CRI plugins off, overlayfs) and nerdctl.toml (every global flag
harpoon's nerdctl needs, so that `harpoon run …` takes none).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harpoon.buildkit.daemon import BuildkitBinaries
from harpoon.devenv.containerd import ContainerdPaths, daemon_environment, render_config
from harpoon.devenv.nerdctl import MINIMUM_CONTAINERD, version_tuple
from harpoon.devenv.tools import BUILDKIT, FLAVOURS, NERDCTL, Flavour
from harpoon.system.layout import NAMESPACE, SNAPSHOTTER, Layout
from harpoon.system.network import DefaultNetwork

CONTAINERD_ENV = "HARPOON_CONTAINERD"
NERDCTL_ENV = "HARPOON_NERDCTL"
CNI_PATH_ENV = "HARPOON_CNI_PATH"
BUILDKITD_ENV = "HARPOON_BUILDKITD"
#: The pinned containerd flavour harpoon prefers.
PINNED_FLAVOUR = "2.3"
#: Debian's containernetworking-plugins, then the CNI project's default.
CNI_PLUGIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
#: The plugins nerdctl's bridge networks and its hooks run, and `doctor` checks.
CNI_PLUGINS = ("bridge", "portmap", "firewall", "tuning", "host-local", "loopback")
#: nerdctl's cgroup manager for harpoon's containers (cgroupfs: cgroupsPath
#: /<namespace>/<id>, as the shim expects on any host).
CGROUP_MANAGER = "cgroupfs"
VERSION_TIMEOUT_S = 10.0
CTR_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ContainerdChoice:
    flavour: Flavour
    #: In words, for `status` and `doctor`: which one and why.
    origin: str


def _executable(path: str | Path) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def containerd_version(binary: Path) -> str | None:
    """The version `containerd --version` prints (third word), None if it cannot run."""
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True,
            timeout=VERSION_TIMEOUT_S, check=False,
        )  # fmt: skip
    except OSError:
        return None
    words = done.stdout.split()
    return words[2].removeprefix("v") if done.returncode == 0 and len(words) >= 3 else None


def _unpinned(binary: Path, origin: str) -> ContainerdChoice | str:
    version = containerd_version(binary)
    if version is None:
        return f"{binary} does not run (`containerd --version` failed)"
    if version_tuple(version) < MINIMUM_CONTAINERD:
        minimum = ".".join(map(str, MINIMUM_CONTAINERD))
        return f"{binary} is containerd {version}: nerdctl needs {minimum} or later"
    major = version_tuple(version)[:1]
    f = Flavour(
        name=version, version=version, bin_dir=binary.parent,
        config_version=3 if major >= (2,) else 2,
    )  # fmt: skip
    missing = f.missing_binaries()
    if missing:
        return f"{binary} has no {', '.join(p.name for p in missing)} beside it"
    return ContainerdChoice(f, f"containerd {version} at {binary} ({origin})")


def find_containerd() -> ContainerdChoice | str:
    """The containerd to run, or why there is none."""
    named = os.environ.get(CONTAINERD_ENV)
    if named:
        return _unpinned(Path(named), f"${CONTAINERD_ENV}")
    pinned = FLAVOURS[PINNED_FLAVOUR]
    if not pinned.missing_binaries():
        return ContainerdChoice(
            pinned, f"containerd {pinned.version} at {pinned.containerd} (pinned, built)"
        )
    on_path = shutil.which("containerd")
    if on_path is None:
        return f"no containerd: the pinned {pinned.version} is not built and none is on PATH"
    return _unpinned(Path(on_path), "on PATH: the pinned one is not built")


def find_nerdctl() -> Path | None:
    named = os.environ.get(NERDCTL_ENV)
    if named:
        return Path(named) if _executable(named) else None
    if not NERDCTL.missing_binaries():
        return NERDCTL.binary
    on_path = shutil.which("nerdctl")
    return Path(on_path) if on_path else None


def find_buildkit() -> BuildkitBinaries | str:
    """The buildkitd and buildctl to run, or why there are none."""
    named = os.environ.get(BUILDKITD_ENV)
    if named:
        pair = BuildkitBinaries(Path(named), Path(named).parent / "buildctl")
    elif not BUILDKIT.missing_binaries():
        return BuildkitBinaries(BUILDKIT.buildkitd, BUILDKIT.buildctl)
    else:
        on_path = [shutil.which(name) for name in ("buildkitd", "buildctl")]
        if None in on_path:
            return f"no buildkitd and buildctl: the pinned {BUILDKIT.version} is not built"
        pair = BuildkitBinaries(*(Path(str(p)) for p in on_path))
    missing = [str(p) for p in (pair.buildkitd, pair.buildctl) if not _executable(p)]
    return f"no {' and no '.join(missing)}" if missing else pair


def find_cni_plugin_dir() -> Path | None:
    """The CNI plugins' directory: $HARPOON_CNI_PATH (whatever it holds), else the first
    of CNI_PLUGIN_DIRS with a bridge plugin."""
    named = os.environ.get(CNI_PATH_ENV)
    if named:
        return Path(named)
    for candidate in CNI_PLUGIN_DIRS:
        if _executable(candidate / "bridge"):
            return candidate
    return None


def missing_cni_plugins(plugin_dir: Path | None) -> list[str]:
    if plugin_dir is None:
        return list(CNI_PLUGINS)
    return [name for name in CNI_PLUGINS if not _executable(plugin_dir / name)]


def ctr_argv(choice: ContainerdChoice, layout: Layout, namespace: str, *args: str) -> list[str]:
    """`ctr ARGS` (the chosen containerd's) on harpoon's containerd, in `namespace`."""
    return [str(choice.flavour.ctr), "--address", str(layout.containerd_socket),
            "--namespace", namespace, *args]  # fmt: skip


def ctr_environment(choice: ContainerdChoice) -> dict[str, str]:
    return daemon_environment([choice.flavour.bin_dir], SNAPSHOTTER)


def ctr(
    choice: ContainerdChoice, layout: Layout, *args: str, namespace: str = NAMESPACE
) -> subprocess.CompletedProcess[str]:
    """Runs ctr_argv to its end, its output captured."""
    return subprocess.run(
        ctr_argv(choice, layout, namespace, *args), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=CTR_TIMEOUT_S,
        env=ctr_environment(choice), check=False,
    )  # fmt: skip


def containerd_paths(layout: Layout) -> ContainerdPaths:
    """devenv's layout of one daemon's files, pointed at harpoon's directories."""
    return ContainerdPaths(
        base=layout.containerd_root,
        config=layout.containerd_config,
        root=layout.containerd_root,
        state=layout.containerd_state,
        opt=layout.containerd_opt,
        address=layout.containerd_socket,
        ttrpc_address=layout.containerd_ttrpc_socket,
    )


def render_containerd_config(f: Flavour, layout: Layout) -> str:
    return render_config(f, containerd_paths(layout), snapshotter=SNAPSHOTTER)


def _toml(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def render_nerdctl_toml(layout: Layout, cni_plugin_dir: Path, network: DefaultNetwork) -> str:
    """nerdctl.toml (its pkg/config keys) for harpoon's containerd, namespace, state and
    CNI network: with it in NERDCTL_TOML, nerdctl and its OCI hooks need no flag."""
    settings: dict[str, str | Path] = {
        "address": layout.containerd_socket,
        "namespace": NAMESPACE,
        "snapshotter": SNAPSHOTTER,
        "data_root": layout.nerdctl_data_root,
        "cni_path": cni_plugin_dir,
        "cni_netconfpath": layout.cni_netconf_dir,
        "cgroup_manager": CGROUP_MANAGER,
        "bridge_ip": network.bridge_ip,
    }
    lines = ["# Written by `harpoon system start`; rewritten at every start."]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"
