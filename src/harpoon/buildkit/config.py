"""buildkitd's configuration for harpoon: where its files are and its `buildkitd.toml`.

What the rendering holds, and why (found by running buildkitd v0.32.2 here):

- **The containerd worker only**, the OCI worker off: the OCI worker runs steps with
  runc on the host, beside harpoon rather than through it. The worker's runtime is
  `io.containerd.harpoon.v1` (`[worker.containerd.runtime] name`: buildkitd has no flag
  for it), so every RUN step is a container of harpoon's, in a VM of its own.
- Its **namespace** is the one the images are in (and where an `--output type=image`
  lands): a build from local images then needs no registry.
- **Everything of its own**: `root` (its cache and history), the gRPC socket, and the
  OpenTelemetry socket (its default, /run/buildkit/otel-grpc.sock, is machine-wide:
  two buildkitds would take each other's). CDI is off, so no machine-wide directory
  (/etc/cdi, /var/run/cdi) is read.
- **The network of a RUN step**: "host" (buildkitd's default) gives the step the
  host's network, which under harpoon is a gvproxy of the step's VM (README, "Which
  network a container gets"); "cni" gives each step a network namespace of its own,
  named by path, configured by buildkitd with the CNI plugins before the step's
  container is created: harpoon runs the VM in it and joins its tap to CNI's veth.
  The CNI network is a bridge of its own name and subnet (`CniBridge`, rendered by
  `render_cni_config`; not buildkitd's own "bridge" mode, whose host-local leases live
  in the machine-wide /var/lib/cni), with no namespace made ahead (cniPoolSize 0: a
  pool is namespaces and veths that a killed buildkitd would leave). `RUN
  --network=none` is a namespace with loopback alone in either mode.
- **Garbage collection** off, or bounded by the bytes the cache may keep.

This module only renders and names paths; harpoon.buildkit.daemon runs buildkitd.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: The runtime buildkitd's containerd worker runs the build's step containers with.
HARPOON_RUNTIME = "io.containerd.harpoon.v1"

NetworkMode = Literal["host", "cni"]
NETWORK_MODES: tuple[NetworkMode, ...] = ("host", "cni")

#: Steps a build runs at once: each is a VM working flat out under TCG.
DEFAULT_MAX_PARALLELISM = 2

#: Where Debian's containernetworking-plugins are.
DEFAULT_CNI_PLUGIN_DIR = Path("/usr/lib/cni")

#: The longest name a Linux network interface may have.
MAX_IFNAME_BYTES = 15


@dataclass(frozen=True)
class CniBridge:
    """The CNI network of a buildkitd in "cni" mode: a bridge of its own name and
    subnet, its gateway the bridge's first address."""

    bridge: str
    subnet: str
    #: NAT the steps' traffic out of the host (iptables rules per step, removed with it).
    masquerade: bool = False

    def __post_init__(self) -> None:
        if not 0 < len(self.bridge.encode()) <= MAX_IFNAME_BYTES:
            raise ValueError(f"bridge name {self.bridge!r}: 1 to {MAX_IFNAME_BYTES} bytes")
        ipaddress.ip_network(self.subnet)  # ValueError names it


@dataclass(frozen=True)
class BuildkitdLayout:
    """Where one buildkitd keeps its files: `root` (its cache and build history, kept
    across restarts) and `run_dir` (its configuration, sockets, pid file and scratch
    mounts: gone with it). Unix socket paths are limited to 107 bytes: keep `run_dir`
    short."""

    root: Path
    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "buildkitd.toml"

    @property
    def socket(self) -> Path:
        """buildkitd's gRPC socket: `buildctl --addr unix://<socket>`."""
        return self.run_dir / "buildkitd.sock"

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def otel_socket(self) -> Path:
        return self.run_dir / "otel-grpc.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "buildkitd.pid"

    @property
    def tmp(self) -> Path:
        """buildkitd's TMPDIR: it mounts each step's root filesystem in a temporary
        directory (`buildkit-mount*`) to read its users and make its working directory;
        here they are its own, and found again if it dies with them mounted."""
        return self.run_dir / "tmp"

    @property
    def cni_config(self) -> Path:
        """The CNI network list of "cni" mode (render_cni_config)."""
        return self.run_dir / "cni.conflist"

    @property
    def cni_ipam(self) -> Path:
        """host-local's leases of "cni" mode: its own, not /var/lib/cni/networks."""
        return self.run_dir / "cni-ipam"

    @property
    def sockets(self) -> tuple[Path, ...]:
        return (self.socket, self.otel_socket)


@dataclass(frozen=True)
class BuildkitdSettings:
    """What a buildkitd is configured with besides its layout."""

    #: containerd's gRPC socket, and the namespace the build's images and steps live in.
    containerd_address: Path
    namespace: str = "default"
    #: The snapshotter the images were unpacked with (buildkitd needs the same one).
    snapshotter: str = "overlayfs"
    network: NetworkMode = "host"
    #: For network "cni": its bridge, and the plugins' directory.
    cni: CniBridge | None = None
    cni_plugin_dir: Path = DEFAULT_CNI_PLUGIN_DIR
    #: None: garbage collection off; else the bytes the build cache may hold.
    gc_max_used_bytes: int | None = None
    max_parallelism: int = DEFAULT_MAX_PARALLELISM
    runtime: str = HARPOON_RUNTIME
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.network not in NETWORK_MODES:
            raise ValueError(f"network mode {self.network!r}: use one of {NETWORK_MODES}")
        if (self.network == "cni") != (self.cni is not None):
            raise ValueError("network mode 'cni', and it alone, needs its CniBridge (cni)")


def _toml_str(value: str | Path) -> str:
    # A JSON string is a valid TOML basic string for what is written here (paths, names).
    return json.dumps(str(value))


def _toml_list(values: Sequence[str | Path]) -> str:
    return "[" + ", ".join(_toml_str(value) for value in values) + "]"


def render_buildkitd_config(settings: BuildkitdSettings, layout: BuildkitdLayout) -> str:
    """The `buildkitd.toml` of a buildkitd of `settings` living in `layout`."""
    gc = settings.gc_max_used_bytes is not None
    lines = [
        f"root = {_toml_str(layout.root)}",
        "",
        "[log]",
        f"  level = {_toml_str(settings.log_level)}",
        "",
        "[grpc]",
        f"  address = {_toml_list([layout.address])}",
        "",
        "[otel]",
        f"  socketPath = {_toml_str(layout.otel_socket)}",
        "",
        "[cdi]",
        "  disabled = true",
        "",
        "[worker.oci]",
        "  enabled = false",
        "",
        "[worker.containerd]",
        "  enabled = true",
        f"  address = {_toml_str(settings.containerd_address)}",
        f"  namespace = {_toml_str(settings.namespace)}",
        f"  snapshotter = {_toml_str(settings.snapshotter)}",
        f"  networkMode = {_toml_str(settings.network)}",
        f"  max-parallelism = {settings.max_parallelism}",
        f"  gc = {'true' if gc else 'false'}",
    ]
    if settings.network == "cni":
        lines += [
            f"  cniConfigPath = {_toml_str(layout.cni_config)}",
            f"  cniBinaryPath = {_toml_str(settings.cni_plugin_dir)}",
            "  cniPoolSize = 0",
        ]
    if gc:
        lines.append(f"  maxUsedSpace = {settings.gc_max_used_bytes}")
    lines += [
        "",
        "  [worker.containerd.runtime]",
        f"    name = {_toml_str(settings.runtime)}",
        "",
    ]
    return "\n".join(lines)


def render_cni_config(network: CniBridge, layout: BuildkitdLayout) -> str:
    """The CNI network list (JSON) buildkitd's "cni" mode reads from layout.cni_config:
    CNI's bridge plugin on `network`'s bridge and subnet, host-local leases in the
    layout (buildkitd adds the loopback network itself)."""
    bridge = {
        "type": "bridge",
        "bridge": network.bridge,
        "isGateway": True,
        "ipMasq": network.masquerade,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": network.subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(layout.cni_ipam),
        },
    }
    document = {"cniVersion": "1.0.0", "name": "harpoon-buildkit", "plugins": [bridge]}
    return json.dumps(document, indent=2) + "\n"
