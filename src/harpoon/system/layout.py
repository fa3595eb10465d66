"""Where harpoon's services keep everything, under harpoon's directories (harpoon.dirs).

    <state>/containerd/            containerd's root (content, snapshots, metadata)
    <state>/config/                containerd.toml, nerdctl.toml (rendered at every start)
    <state>/log/<service>.log      each service's log
    <state>/nerdctl/               nerdctl's data root (names, logs, volumes, /etc files)
    <state>/cni/net.d/             nerdctl's CNI configurations (its default network's)
    <state>/cni/networks/          host-local's address reservations for that network
    <run>/containerd/              containerd's state (task bundles) and its sockets
    <run>/services/                the services' pid files and the start/stop lock
    <state>/buildkit/              buildkitd's root: its build cache and history
    <run>/buildkit/                buildkitd's buildkitd.toml, sockets, pid file, TMPDIR

<state> is /var/lib/harpoon and <run> /run/harpoon unless HARPOON_ROOT moves them.
Nothing here creates a file: `Layout.current()` only computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harpoon import dirs
from harpoon.buildkit.config import BuildkitdLayout

#: The containerd namespace harpoon's containers and images live in.
NAMESPACE = "harpoon"
#: The containerd namespace of buildkitd's containerd worker: its step containers, its
#: snapshots and leases, and the images a build may start FROM (shared from NAMESPACE by
#: harpoon.system.buildkitd). Nothing else lives there, so every container in it that no
#: running buildkitd owns is a step's leftover.
BUILDKIT_NAMESPACE = "harpoon-buildkit"
#: The runtime harpoon's containerd runs containers with unless told otherwise.
RUNTIME = "io.containerd.harpoon.v1"
#: The snapshotter (containerd's default on Linux; nerdctl's and the shim's rootfs path).
SNAPSHOTTER = "overlayfs"


@dataclass(frozen=True)
class Layout:
    state: Path
    run: Path

    #: Whether the run directory is this harpoon's alone (under a HARPOON_ROOT): the
    #: machine's /run/harpoon also holds the VMs of a system containerd's harpoon shims.
    exclusive: bool = False

    @classmethod
    def current(cls) -> Layout:
        """The layout harpoon.dirs gives for this process's environment."""
        root, run = dirs.root(), dirs.run_dir()
        exclusive = root is not None and (run == root or run.startswith(root + "/"))
        return cls(state=Path(dirs.state_dir()), run=Path(run), exclusive=exclusive)

    @property
    def config_dir(self) -> Path:
        return self.state / "config"

    @property
    def log_dir(self) -> Path:
        return self.state / "log"

    @property
    def services_dir(self) -> Path:
        """Pid files and the lock that serialises start and stop."""
        return self.run / "services"

    @property
    def lock_file(self) -> Path:
        return self.services_dir / "lock"

    def pid_file(self, service: str) -> Path:
        return self.services_dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.log_dir / f"{service}.log"

    # -- containerd --------------------------------------------------------------------

    @property
    def containerd_root(self) -> Path:
        return self.state / "containerd"

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def containerd_config(self) -> Path:
        return self.config_dir / "containerd.toml"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_state / "containerd.sock"

    @property
    def containerd_ttrpc_socket(self) -> Path:
        return self.containerd_state / "containerd.sock.ttrpc"

    @property
    def containerd_opt(self) -> Path:
        """containerd's opt plugin's directory (else the machine-wide /opt/containerd)."""
        return self.state / "containerd-opt"

    # -- buildkitd -----------------------------------------------------------------------

    @property
    def buildkitd(self) -> BuildkitdLayout:
        """buildkitd's files: its cache under the state, its sockets under the run
        directory (harpoon.buildkit.config.BuildkitdLayout)."""
        return BuildkitdLayout(root=self.state / "buildkit", run_dir=self.run / "buildkit")

    # -- nerdctl and CNI -----------------------------------------------------------------

    @property
    def nerdctl_toml(self) -> Path:
        return self.config_dir / "nerdctl.toml"

    @property
    def nerdctl_data_root(self) -> Path:
        return self.state / "nerdctl"

    @property
    def cni_netconf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.state / "cni" / "networks"

    def service_directories(self) -> list[Path]:
        """The directories `harpoon system start` makes (root's alone: harpoon.private)."""
        return [self.config_dir, self.log_dir, self.services_dir, self.containerd_root,
                self.containerd_state, self.cni_netconf_dir, self.cni_ipam_dir]  # fmt: skip

    def check_sockets(self) -> None:
        """harpoon.dirs.SocketPathTooLong naming the first socket too long to bind."""
        dirs.check_run_dir()
        for socket in (self.containerd_socket, self.containerd_ttrpc_socket):
            dirs.check_socket_path(socket, "containerd's socket")
        for socket in self.buildkitd.sockets:
            dirs.check_socket_path(socket, "buildkitd's socket")
