"""A buildkitd for tests, on a throw-away containerd (harpoon.devenv.containerd), with
every file of it in one short temporary directory, and buildctl to drive it.

It is harpoon.buildkit's buildkitd (the front door's), set up for a test: its
containerd worker in the daemon's namespace (where the busybox image was imported and
where built images land), the harpoon runtime, garbage collection off, its log beside
containerd's; in "cni" mode, a bridge and a /24 of its own (`unused_cni_bridge`), removed
with it. `stop()` leaves nothing: no process, socket, mount or directory (the
step containers are containerd's, checked by the e2e fixtures).

Builds are offline: the Dockerfile frontend is buildkitd's built-in one (`--frontend
dockerfile.v0`, no gateway image to pull) and a `FROM` names an image already in the
namespace.
"""

from __future__ import annotations

import atexit
import ipaddress
import random
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from harpoon.buildkit.config import BuildkitdLayout, BuildkitdSettings, CniBridge, NetworkMode
from harpoon.buildkit.daemon import BuildkitBinaries, start_buildkitd, stop_buildkitd
from harpoon.devenv.containerd import Containerd
from harpoon.devenv.host import unmount_under
from harpoon.devenv.tools import BUILDKIT

#: Where a "cni" buildkitd's bridge subnet is picked (a /24 no route of the host's meets).
CNI_SUBNETS = ipaddress.IPv4Network("10.231.0.0/16")

#: One `buildctl build` of a small Dockerfile: a few VMs, each ~0.3 s restored and
#: ~5 s cold under TCG; this only catches a hung build.
BUILD_TIMEOUT_S = 300.0


class Buildkitd:
    """One buildkitd serving builds against `containerd`, from start() to stop()."""

    def __init__(
        self,
        containerd: Containerd,
        *,
        network: NetworkMode = "host",
        log_dir: Path | None = None,
        binaries: BuildkitBinaries | None = None,
    ) -> None:
        self.containerd = containerd
        self.network = network
        self.cni = unused_cni_bridge() if network == "cni" else None
        self.binaries = binaries or BuildkitBinaries(BUILDKIT.buildkitd, BUILDKIT.buildctl)
        self._log_dir = log_dir
        self._base: Path | None = None
        self.pid: int | None = None

    @property
    def base(self) -> Path:
        if self._base is None:
            raise RuntimeError("buildkitd has not been started")
        return self._base

    @property
    def layout(self) -> BuildkitdLayout:
        return BuildkitdLayout(root=self.base / "root", run_dir=self.base / "run")

    @property
    def log_path(self) -> Path:
        if self._log_dir is not None:
            return self._log_dir / f"buildkitd-{self.base.name}.log"
        return self.base / "buildkitd.log"

    def start(self) -> Buildkitd:
        # In /tmp, not $TMPDIR: its sockets' paths must stay well under 108 bytes.
        self._base = Path(tempfile.mkdtemp(prefix="hp-bk-", dir="/tmp"))
        atexit.register(self.stop)
        settings = BuildkitdSettings(
            containerd_address=Path(self.containerd.address),
            namespace=self.containerd.namespace,
            network=self.network,
            cni=self.cni,
        )
        try:
            self.pid = start_buildkitd(self.binaries, settings, self.layout, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[str]:
        """Stops buildkitd (harpoon.buildkit.daemon.stop_buildkitd, which undoes what a
        buildkitd that died left mounted) and removes its directory; returns the mounts
        left there even so, which this had to unmount (none, if stop_buildkitd does its
        job). Idempotent."""
        if self._base is None:
            return []
        stop_buildkitd(self.layout)
        left = unmount_under(self._base)
        shutil.rmtree(self._base, ignore_errors=True)
        self._base = None
        self.pid = None
        atexit.unregister(self.stop)
        return left

    def buildctl(self, *args: str) -> list[str]:
        """The command line of `buildctl ARGS` against this buildkitd."""
        return self.binaries.buildctl_command(self.layout, *args)

    def build_command(
        self,
        context: Path,
        *,
        image: str | None = None,
        secrets: Mapping[str, Path] | None = None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """`buildctl build` of the Dockerfile in `context` with the built-in Dockerfile
        frontend, plain progress; the result exported as `image` into containerd's
        namespace if named; `secrets`: id -> file (`RUN --mount=type=secret,id=…`)."""
        args = [
            "build", "--progress=plain", "--frontend", "dockerfile.v0",
            "--local", f"context={context}", "--local", f"dockerfile={context}",
        ]  # fmt: skip
        for name, path in (secrets or {}).items():
            args += ["--secret", f"id={name},src={path}"]
        if image is not None:
            args += ["--output", f"type=image,name={image}"]
        return self.buildctl(*args, *extra)

    def build(
        self,
        context: Path,
        *,
        image: str | None = None,
        secrets: Mapping[str, Path] | None = None,
        timeout_s: float = BUILD_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Runs build_command to its end; its progress is on stderr."""
        return subprocess.run(
            self.build_command(context, image=image, secrets=secrets),
            capture_output=True, text=True, timeout=timeout_s, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


def unused_cni_bridge() -> CniBridge:
    """A bridge of a name and a /24 of CNI_SUBNETS that nothing on the host uses."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for line in routes.splitlines():
        words = line.split()
        for word in words[:2]:
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    candidates = list(CNI_SUBNETS.subnets(new_prefix=24))
    random.shuffle(candidates)
    for subnet in candidates:
        if not any(subnet.overlaps(network) for network in used):
            return CniBridge(f"hpbk{secrets.token_hex(4)}", str(subnet))
    raise RuntimeError(f"every /24 of {CNI_SUBNETS} is routed on this host")
