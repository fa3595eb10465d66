"""nerdctl (v2.3.5, built by scripts/install-deps: `harpoon.devenv.tools.NERDCTL`) driving
a throw-away containerd (harpoon.devenv.containerd), offline, with nothing of it outside
one directory: its command line and environment. The e2e tests (tests/e2e/nerdctl.py)
and the network benchmark (bench/net.py) run it this way.

What it takes to run nerdctl against our throw-away containerd with no network (found
by trying it, 2026-12-06, on this Debian 12 host: cgroup v1, no systemd, no AppArmor):

- `--address` and `--namespace` of the daemon (nerdctl's defaults are the machine's
  /run/containerd/containerd.sock and "default").
- `--data-root` in that directory: nerdctl keeps there, per containerd address, every
  container's /etc/hosts, /etc/resolv.conf and /etc/hostname (which it bind-mounts into
  the container), its name store, its json-file logs and the named volumes
  (`volumes/<namespace>/<name>/_data`). Its default is /var/lib/nerdctl.
- `--cni-netconfpath` in that directory: even `--net none` takes a lock file
  (`.cni-concurrency.lock`) in the CNI config directory, creating /etc/cni/net.d
  otherwise; the networks made with `nerdctl network create` are written there
  (harpoon.devenv.cni).
- `--cni-path /usr/lib/cni`, where Debian's containernetworking-plugins are (nerdctl's
  default is /opt/cni/bin): `run --net NETWORK` runs them from nerdctl's createRuntime
  and postStop OCI hooks (`nerdctl internal oci-hook`, run on the host by runc and by
  harpoon alike). With `--net none` no plugin runs.
- `NERDCTL_TOML` naming a file that does not exist: the machine's
  /etc/nerdctl/nerdctl.toml, if any, is not read.
- `--snapshotter overlayfs` (nerdctl's default too, and where `ctr image import`
  unpacked the image; explicit so that CONTAINERD_SNAPSHOTTER cannot change it) and
  `--cgroup-manager cgroupfs` (nerdctl's default on a cgroup v1 host or one without
  systemd, as here; on cgroup v2 with systemd it would pick systemd): cgroupsPath is then
  `/<namespace>/<id>`, as `ctr run` makes it.
- An image imported by `ctr` is found by its name; `--pull never` on every `run` makes
  a missing image an error at once instead of a pull from docker.io. No registry flag
  (`--insecure-registry`, `--hosts-dir`) is needed.
- nerdctl 2.3 supports containerd 1.7 and later only (MINIMUM_CONTAINERD).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.containerd import SNAPSHOTTER, Containerd

#: The first containerd release nerdctl 2.3 supports.
MINIMUM_CONTAINERD = (1, 7)
#: How long a nerdctl command that does not start a container may take.
COMMAND_TIMEOUT_S = 120.0
#: Where the CNI plugins are (Debian's containernetworking-plugins).
CNI_PLUGIN_DIR = Path("/usr/lib/cni")


def version_tuple(version: str) -> tuple[int, ...]:
    """(1, 6, 20) of "1.6.20" or "1.6.20~ds1"."""
    numbers = []
    for part in version.split("~")[0].split("+")[0].split("-")[0].split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


@dataclass
class OfflineNerdctl:
    """One nerdctl set up for one containerd, with all its state under `base`."""

    binary: Path
    containerd: Containerd
    base: Path

    @property
    def data_root(self) -> Path:
        return self.base / "data-root"

    @property
    def cni_config_dir(self) -> Path:
        return self.base / "cni-net.d"

    def command(self, *args: str) -> list[str]:
        return [
            str(self.binary),
            "--address", self.containerd.address,
            "--namespace", self.containerd.namespace,
            "--data-root", str(self.data_root),
            "--cni-netconfpath", str(self.cni_config_dir),
            "--cni-path", str(CNI_PLUGIN_DIR),
            "--snapshotter", SNAPSHOTTER,
            "--cgroup-manager", "cgroupfs",
            *args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, NERDCTL_TOML=str(self.base / "nerdctl.toml"))
        # Defaults of flags we pass anyway.
        for name in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER",
                     "CNI_PATH", "NETCONFPATH"):  # fmt: skip
            env.pop(name, None)
        return env

    def check(self, *args: str) -> str:
        """`nerdctl ARGS`, which must succeed (else RuntimeError, quoting its stderr);
        its stdout."""
        done = subprocess.run(
            self.command(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT_S, env=self.environment(), check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"nerdctl {' '.join(args)}: status {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout
