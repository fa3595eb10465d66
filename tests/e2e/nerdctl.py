"""nerdctl (v2.3.5, built by scripts/install-deps: `harpoon.devenv.tools.NERDCTL`) driving
the session's containerd, offline, with nothing of it outside a temporary directory.

What it takes to run nerdctl against our throw-away containerd with no network (found
by trying it, 2026-12-06, on this Debian 12 host: cgroup v1, no systemd, no AppArmor):

- `--address` and `--namespace` of the session's daemon (nerdctl's defaults are the
  machine's /run/containerd/containerd.sock and "default").
- `--data-root` in a temporary directory of the session: nerdctl keeps there, per
  containerd address, every container's /etc/hosts, /etc/resolv.conf and /etc/hostname
  (which it bind-mounts into the container), its name store, its json-file logs and the
  named volumes (`volumes/<namespace>/<name>/_data`). Its default is /var/lib/nerdctl.
- `--cni-netconfpath` in that directory: even `--net none` takes a lock file
  (`.cni-concurrency.lock`) in the CNI config directory, creating /etc/cni/net.d
  otherwise; the networks a test creates (`nerdctl network create`) are written there.
- `--cni-path /usr/lib/cni`, where Debian's containernetworking-plugins are (nerdctl's
  default is /opt/cni/bin): `run --net NETWORK` runs them from nerdctl's createRuntime
  and postStop OCI hooks (`nerdctl internal oci-hook`, run on the host by runc and by
  harpoon alike). With `--net none` (`run_args`' default) no plugin runs.
- `NERDCTL_TOML` naming a file that does not exist: the machine's
  /etc/nerdctl/nerdctl.toml, if any, is not read.
- `--snapshotter overlayfs` (nerdctl's default too, and where `ctr image import`
  unpacked the image; explicit so that CONTAINERD_SNAPSHOTTER cannot change it) and
  `--cgroup-manager cgroupfs` (nerdctl's default on a cgroup v1 host or one without
  systemd, as here; on cgroup v2 with systemd it would pick systemd): cgroupsPath is then
  `/<namespace>/<id>`, as `ctr run` makes it.
- The busybox image imported by `ctr` is found by its name (`busybox_image`); `--pull
  never` on every `run` makes a missing image an error at once instead of a pull from
  docker.io. No registry flag (`--insecure-registry`, `--hosts-dir`) is needed.
- nerdctl 2.3 supports containerd 1.7 and later only: the fixture skips on 1.6.

`--rm` runs remove their container; the fixture removes every container (`nerdctl rm
-f`) and volume (`nerdctl volume rm`) a test leaves before the `containerd` fixture's
leak check.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.containerd import SNAPSHOTTER, Containerd
from tests.e2e.differential import CTR_RUN_TIMEOUT_S, Result, normalised

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
class Nerdctl:
    """One nerdctl set up for one containerd, with all its state under `base`."""

    binary: Path
    containerd: Containerd
    base: Path
    image: str

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

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT_S
    ) -> Result:
        """Runs `nerdctl ARGS`; its output without nerdctl's own `level=warning` lines."""
        proc = subprocess.run(
            self.command(*args), input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, timeout=timeout, env=self.environment(), check=False,
        )  # fmt: skip
        return result(proc.returncode, proc.stdout, proc.stderr)

    def check(self, *args: str) -> str:
        """`nerdctl ARGS`, which must succeed; its stdout."""
        done = self(*args)
        assert done.status == 0, f"nerdctl {' '.join(args)}: status {done.status}: {done.err}"
        return done.out

    def run_args(self, runtime: str, *args: str, net: str = "none") -> tuple[str, ...]:
        """`run --runtime RUNTIME --net NET --pull never ARGS` (ARGS ends with the
        command; the image is `self.image`)."""
        return ("run", "--runtime", runtime, "--net", net, "--pull", "never", *args)

    def run(
        self, runtime: str, *args: str, input: bytes | None = None, net: str = "none"
    ) -> Result:
        """`nerdctl run` (`run_args`) to its end (for `-d`, until the container runs)."""
        return self(*self.run_args(runtime, *args, net=net), input=input, timeout=CTR_RUN_TIMEOUT_S)

    def start(self, runtime: str, *args: str, net: str = "none") -> subprocess.Popen[bytes]:
        """`nerdctl run` (`run_args`) in the background, its output in pipes; pass what
        it gave to `result`."""
        return subprocess.Popen(
            self.command(*self.run_args(runtime, *args, net=net)), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.environment(),
        )  # fmt: skip

    def volume_path(self, name: str) -> Path:
        """The host directory of a named volume."""
        return Path(self.check("volume", "inspect", "--format", "{{.Mountpoint}}", name).strip())

    def containers(self) -> list[str]:
        """IDs of every container in the namespace, running or not."""
        return self.check("ps", "--all", "--quiet", "--no-trunc").split()

    def volumes(self) -> list[str]:
        return self.check("volume", "ls", "--quiet").split()

    def remove_all(self) -> list[str]:
        """Removes every container (`rm -f`) and volume; returns what there was."""
        containers, volumes = self.containers(), self.volumes()
        if containers:
            self.check("rm", "--force", *containers)
        if volumes:
            self.check("volume", "rm", *volumes)
        return [*containers, *(f"volume {name}" for name in volumes)]


#: nerdctl run forwards every signal it gets (Go's runtime sends itself SIGURG) to its
#: task until the task is gone, and logs a Kill that loses the race with the task's
#: deletion: "forward signal child exited" with ttrpc's "closed" under runc's shim too.
FORWARD_SIGNAL_RACE = re.compile(rb'^time="[^"]*" level=error msg="forward signal .*\n?', re.M)


def result(status: int, stdout: bytes, stderr: bytes) -> Result:
    """A nerdctl command's outcome, without nerdctl's own `level=warning` lines nor its
    racy signal-forwarding errors (FORWARD_SIGNAL_RACE)."""
    return Result(
        status, normalised(stdout, ""), normalised(FORWARD_SIGNAL_RACE.sub(b"", stderr), "")
    )
