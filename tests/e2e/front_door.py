"""What the front door's e2e modules share: the `harpoon` command on a temporary
HARPOON_ROOT of its own, what it leaves behind, and its module-scoped services
(`services_on_new_root`): `harpoon system start` and the busybox image loaded with
`harpoon load`; `harpoon system stop` at the end, which must leave nothing.

The guest image and the VM templates are the runner's (HARPOON_GUEST_DIR and
HARPOON_TEMPLATE_DIR as harpoon.dirs resolves them here: building either per session
would cost minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from harpoon import dirs
from harpoon.devenv.host import mount_points, shim_processes
from harpoon.devenv.images import BUSYBOX_REF, build_busybox_image, default_cache_dir
from harpoon.devenv.tools import FLAVOURS, NERDCTL
from harpoon.system import network
from tests.prerequisites import unavailable

#: One harpoon command (a VM's cold boot under TCG is ~6 s; a loaded machine, more).
COMMAND_TIMEOUT_S = 180.0
#: `system start` and `stop` (stop waits up to 10 s for containers, 10 s for containerd).
SYSTEM_TIMEOUT_S = 180.0
POLL_INTERVAL_S = 0.1
TIME = re.compile(r'^time="[^"]*" ')
#: The reference `harpoon load` gives the busybox image.
IMAGE = "docker.io/library/busybox:harpoon"


@dataclass(frozen=True)
class Done:
    status: int
    out: str
    err: str


@dataclass(frozen=True)
class Harpoon:
    """The `harpoon` command on one root."""

    root: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> Done:
        done = subprocess.run(
            [sys.executable, "-m", "harpoon.cli", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        return Done(done.returncode, done.stdout, _without_warnings(done.stderr))

    def check(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        done = self(*args, timeout=timeout)
        assert done.status == 0, f"harpoon {' '.join(args)}: status {done.status}: {done.err}"
        return done.out

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def log_tail(self, lines: int = 40) -> str:
        """The end of harpoon's containerd's log (the shims' errors are copied there)."""
        log = self.root / "lib" / "log" / "containerd.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def default_network(self) -> network.DefaultNetwork:
        found = network.read(self.root / "lib" / "cni" / "net.d")
        assert found is not None
        return found


def _without_warnings(stderr: str) -> str:
    """nerdctl's stderr without its warnings and its log lines' times."""
    lines = stderr.splitlines(keepends=True)
    return "".join(TIME.sub("", line) for line in lines if "level=warning" not in line)


def harpoon_on_new_root() -> Harpoon:
    # /tmp, short: the VMs' sockets under <root>/run must fit in sun_path.
    root = Path(tempfile.mkdtemp(prefix="hp-fd-", dir="/tmp"))
    env = dict(os.environ)
    env.update({
        dirs.ROOT_ENV: str(root),
        dirs.GUEST_DIR_ENV: dirs.guest_dir(),
        dirs.TEMPLATE_DIR_ENV: dirs.template_dir(),
    })  # fmt: skip
    env.pop(dirs.RUN_DIR_ENV, None)
    return Harpoon(root, env)


def processes_naming_root(harpoon: Harpoon, besides: Collection[str] = ()) -> list[str]:
    """Processes whose command line names the root (a VM, a gvproxy, a daemon) but
    this one and the pids `besides`, then harpoon's shims of its containerd, then mounts
    under the root."""
    root, skipped = str(harpoon.root), {str(os.getpid()), *besides}
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or pid_dir.name in skipped:
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if root in argv:
            found.append(f"process {pid_dir.name}: {argv[:200]}")
    found += [f"shim {s}" for s in shim_processes() if root in (s.flag("address") or "")]
    return found + [f"mount {m}" for m in mount_points() if m.startswith(root)]


def leftovers(harpoon: Harpoon) -> list[str]:
    """What names the root after `harpoon system stop`: processes (a VM, a shim, a
    daemon), mounts, network namespaces, sockets, pid files, the bridge."""
    found = processes_naming_root(harpoon)
    found += [f"netns {n}" for n in (harpoon.run_dir / "netns").glob("*")]
    for path in harpoon.root.rglob("*"):
        if path.is_socket() or path.name.endswith(".pid"):
            found.append(f"file {path}")
    bridge = harpoon.default_network().bridge
    if Path(f"/sys/class/net/{bridge}").exists():
        found.append(f"bridge {bridge}")
    return found


def start_system(harpoon: Harpoon) -> None:
    harpoon.check("system", "start", timeout=SYSTEM_TIMEOUT_S)
    tar = build_busybox_image(default_cache_dir(), BUSYBOX_REF)
    harpoon.check("load", "-i", str(tar))


def stop_system(harpoon: Harpoon) -> list[str]:
    """`harpoon system stop`, then what it left (removed, so that nothing leaks)."""
    try:
        harpoon.check("system", "stop", timeout=SYSTEM_TIMEOUT_S)
        return leftovers(harpoon)
    finally:
        shutil.rmtree(harpoon.root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def services_on_new_root() -> Iterator[Harpoon]:
    """A module's harpoon (for a module-scoped fixture): its services started on a new
    root, the busybox image loaded; stopped at the end, which must leave nothing."""
    if os.geteuid() != 0:
        unavailable("the front door's tests need root: containerd, CNI and VMs run as root")
    if FLAVOURS["2.3"].missing_binaries() and shutil.which("containerd") is None:
        unavailable(f"no containerd: {FLAVOURS['2.3'].install_hint()}")
    if NERDCTL.missing_binaries() and shutil.which("nerdctl") is None:
        unavailable(f"nerdctl is not built: {NERDCTL.install_hint()}")
    if not Path("/bin/busybox").exists():
        unavailable("busybox-static is not installed: run scripts/install-deps")
    session = harpoon_on_new_root()
    try:
        start_system(session)
    except BaseException:
        stop_system(session)
        raise
    yield session
    left = stop_system(session)
    assert not left, f"harpoon system stop left: {left}"
