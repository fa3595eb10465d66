"""A real containerd daemon for tests, with all its state in one short temporary directory.

`Containerd` starts a pinned containerd (see `harpoon.devenv.tools.FLAVOURS`) as root with
its config, root, state, sockets and log under `/tmp/hp-XXXXXXXX`, the CRI plugins
disabled and overlayfs as the snapshotter, and drives it with the matching `ctr`.
`stop()` leaves nothing behind: no daemon, no shim (containerd does not kill its shims
when it exits), no mount, no directory.

It must never touch the machine's own containerd (/run/containerd, /var/lib/containerd):
every path it creates or removes is under its temporary directory, except the shim
sockets of shims it had to kill, which containerd puts in /run/containerd/s.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from harpoon.devenv.host import (
    ShimProcess,
    delete_runc_containers_under,
    is_under,
    kill_process_trees,
    mount_points,
    remove_cgroups,
    remove_ctr_fifos,
    shim_processes,
    unmount_under,
)
from harpoon.devenv.images import ANNOTATION_CONTAINERD_NAME
from harpoon.devenv.tools import EROFS_UTILS, Flavour, flavour

T = TypeVar("T")

#: How long a fresh containerd may take to answer `ctr version` (typically 0.1-0.3 s).
START_TIMEOUT_S = 30.0
#: How long containerd gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 10.0
#: Default timeout of one `ctr` invocation.
CTR_TIMEOUT_S = 60.0
#: Timeout of `ctr image import` (the busybox image takes ~0.1 s).
IMPORT_TIMEOUT_S = 300.0
#: Poll interval while waiting for the daemon or for processes to go away.
POLL_INTERVAL_S = 0.05
#: Lines of containerd's log quoted in errors.
LOG_TAIL_LINES = 40
#: Kernel limit on a unix socket path (sun_path), including the terminating NUL.
UNIX_PATH_MAX_BYTES = 108

#: The CRI plugins of each release line: the tests drive containerd with ctr only, and
#: CRI would otherwise start a streaming server, CNI setup and pause-image handling.
CRI_PLUGINS_V1 = ("io.containerd.grpc.v1.cri",)
CRI_PLUGINS_V2 = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    # Depends on the CRI runtime plugin and fails to load without it.
    "io.containerd.podsandbox.controller.v1.podsandbox",
    # NRI listens on the machine-wide /var/run/nri/nri.sock.
    "io.containerd.nri.v1.nri",
)

#: The snapshotter ctr uses (its default on Linux, made explicit for every `ctr` we run).
SNAPSHOTTER = "overlayfs"

#: The erofs snapshotter (containerd >= 2.2; darwin's default): each layer an erofs image
#: made by the erofs differ (`mkfs.erofs --tar`), no unpacked tree.
EROFS_SNAPSHOTTER = "erofs"

#: Size of an erofs snapshot's writable layer in block mode: an ext4 image containerd's
#: mount manager formats with mkfs.ext4 (darwin's default is 64 MiB; set here, because
#: on Linux the snapshotter defaults to directory mode).
EROFS_WRITABLE_SIZE = "64MiB"

#: Plugins to disable, by config schema version.
CRI_PLUGINS = {2: CRI_PLUGINS_V1, 3: CRI_PLUGINS_V2}


#: Where containerd (1.6 to 2.3) keeps the task bundles under its state directory:
#: <state>/TASK_BUNDLES/<namespace>/<id>.
TASK_BUNDLES = "io.containerd.runtime.v2.task"
#: How long `containerd-shim-harpoon-v1 delete` may take (a dead shim's VM to kill).
SHIM_DELETE_TIMEOUT_S = 30.0


class ContainerdError(RuntimeError):
    """containerd did not start, or a `ctr` command failed."""


@dataclass(frozen=True)
class ContainerdPaths:
    """Everything one daemon writes, laid out under one base directory."""

    base: Path
    config: Path
    root: Path
    state: Path
    opt: Path
    address: Path
    ttrpc_address: Path

    @classmethod
    def under(cls, base: Path) -> ContainerdPaths:
        return cls(
            base=base,
            config=base / "config.toml",
            root=base / "root",
            state=base / "state",
            opt=base / "opt",
            address=base / "containerd.sock",
            ttrpc_address=base / "containerd.sock.ttrpc",
        )

    def check_socket_lengths(self) -> None:
        """Fails early, with the culprit, if a socket path would exceed sun_path."""
        for sock in (self.address, self.ttrpc_address):
            if len(os.fsencode(sock)) >= UNIX_PATH_MAX_BYTES:
                raise ContainerdError(
                    f"socket path {sock} is {len(os.fsencode(sock))} bytes, the limit is "
                    f"{UNIX_PATH_MAX_BYTES - 1}: use a shorter base directory"
                )


def _toml_str(value: str | Path) -> str:
    # A JSON string is a valid TOML basic string for everything we write (paths, ids).
    return json.dumps(str(value))


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def render_config(
    f: Flavour,
    paths: ContainerdPaths,
    *,
    log_level: str = "info",
    snapshotter: str = SNAPSHOTTER,
) -> str:
    """The containerd config.toml for flavour `f` with all state under `paths`.

    1.x reads schema version 2; 2.x reads version 3 (2.3 migrates it to its own version 4
    at start-up with a warning, which keeps one rendering valid for 2.0 through 2.3).
    The top-level `[grpc]`/`[ttrpc]` sections exist in both schemas.

    With the erofs `snapshotter` (2.x only): the erofs snapshotter in block mode (its
    `default_size`: every active snapshot gets a writable ext4 image of that size, as on
    darwin) and the erofs differ first in the diff service, so that layers are unpacked
    with `mkfs.erofs --tar` (found on containerd's PATH) and nothing is mounted to unpack.
    """
    if f.config_version not in CRI_PLUGINS:
        raise ValueError(f"containerd {f.name}: no config renderer for version {f.config_version}")
    if snapshotter not in (SNAPSHOTTER, EROFS_SNAPSHOTTER):
        raise ValueError(f"no config renderer for the {snapshotter!r} snapshotter")
    if snapshotter == EROFS_SNAPSHOTTER and f.config_version < 3:
        raise ValueError(f"containerd {f.name} has no erofs snapshotter (2.2 and later)")
    lines = [
        f"version = {f.config_version}",
        f"root = {_toml_str(paths.root)}",
        f"state = {_toml_str(paths.state)}",
        f"disabled_plugins = {_toml_list(CRI_PLUGINS[f.config_version])}",
        "",
        "[grpc]",
        f"  address = {_toml_str(paths.address)}",
        "",
        "[ttrpc]",
        f"  address = {_toml_str(paths.ttrpc_address)}",
        "",
        "[debug]",
        f"  level = {_toml_str(log_level)}",
        "",
        # The opt plugin would otherwise create the machine-wide /opt/containerd.
        '[plugins."io.containerd.internal.v1.opt"]',
        f"  path = {_toml_str(paths.opt)}",
        "",
    ]
    if snapshotter == EROFS_SNAPSHOTTER:
        lines += [
            '[plugins."io.containerd.snapshotter.v1.erofs"]',
            f"  default_size = {_toml_str(EROFS_WRITABLE_SIZE)}",
            "",
            '[plugins."io.containerd.service.v1.diff-service"]',
            f"  default = {_toml_list(['erofs', 'walking'])}",
            "",
        ]
    return "\n".join(lines)


@dataclass
class StopReport:
    """What `Containerd.stop()` had to clean up besides the daemon itself."""

    leaked_shims: list[ShimProcess] = field(default_factory=list)
    killed_pids: list[int] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    removed_sockets: list[str] = field(default_factory=list)
    removed_cgroups: list[str] = field(default_factory=list)
    deleted_runc_containers: list[str] = field(default_factory=list)
    removed_fifos: list[str] = field(default_factory=list)
    daemon_killed: bool = False

    @property
    def clean(self) -> bool:
        return not (self.leaked_shims or self.unmounted or self.daemon_killed)

    def __str__(self) -> str:
        if self.clean:
            return "stopped cleanly"
        parts = []
        if self.daemon_killed:
            parts.append(f"containerd ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s and was killed")
        if self.leaked_shims:
            shims = "; ".join(map(str, self.leaked_shims))
            parts.append(f"killed {len(self.leaked_shims)} leaked shim(s) [{shims}]")
        if self.unmounted:
            parts.append(f"unmounted {', '.join(self.unmounted)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Bundle:
    """What stop() needs to know of a task bundle left in the state directory."""

    container_id: str
    cgroups_path: str | None


class Containerd:
    """One containerd daemon of a given flavour, owned by the test session that started it.

    Use as a context manager, or call `start()` and `stop()`. Requires root.
    """

    def __init__(
        self,
        flavour_name: str | Flavour = "1.6",
        *,
        path_prepend: Sequence[Path] = (),
        namespace: str = "default",
        log_dir: Path | None = None,
        log_level: str = "info",
        start_timeout_s: float = START_TIMEOUT_S,
        snapshotter: str = SNAPSHOTTER,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """extra_env: set in the daemon's environment, which its shims inherit (a
        harpoon setting such as HARPOON_BIND_SHARES for every container it runs)."""
        self.flavour = flavour(flavour_name) if isinstance(flavour_name, str) else flavour_name
        self.extra_env = dict(extra_env or {})
        self.snapshotter = snapshotter
        self.path_prepend = [Path(p) for p in path_prepend]
        if snapshotter == EROFS_SNAPSHOTTER:
            # The erofs differ runs `mkfs.erofs --tar`: the one built from trixie's source.
            self.path_prepend.append(EROFS_UTILS.cache_dir)
        self.namespace = namespace
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self._log_dir = log_dir
        self._paths: ContainerdPaths | None = None
        self._log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._version: str | None = None

    # -- paths -------------------------------------------------------------------------

    def _started(self, value: T | None) -> T:
        """`value`, which is set from start() to stop(); else a clear error."""
        if value is None:
            raise ContainerdError(f"containerd {self.flavour.name} has not been started")
        return value

    @property
    def paths(self) -> ContainerdPaths:
        return self._started(self._paths)

    @property
    def address(self) -> str:
        """The gRPC socket path (what `ctr --address` and shims' `-address` take)."""
        return str(self.paths.address)

    @property
    def ttrpc_address(self) -> str:
        return str(self.paths.ttrpc_address)

    @property
    def root_dir(self) -> Path:
        return self.paths.root

    @property
    def state_dir(self) -> Path:
        return self.paths.state

    @property
    def log_path(self) -> Path:
        return self._started(self._log_path)

    @property
    def version(self) -> str:
        """The server version reported by `ctr version`, e.g. `1.6.20~ds1`."""
        return self._started(self._version)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> Containerd:
        """Creates the temporary directory, writes the config and starts the daemon."""
        if self._paths is not None:
            raise ContainerdError(
                f"containerd {self.flavour.name} already started at {self.address}"
            )
        missing = self.flavour.missing_binaries()
        if self.snapshotter == EROFS_SNAPSHOTTER:
            missing += EROFS_UTILS.missing_binaries()
        if missing:
            raise ContainerdError(
                f"containerd {self.flavour.name} binaries missing: "
                f"{', '.join(map(str, missing))}; {self.flavour.install_hint()}"
                + (f"; {EROFS_UTILS.install_hint()}" if EROFS_UTILS.missing_binaries() else "")
            )
        # mkdtemp in /tmp, not $TMPDIR: socket paths must stay well under 108 bytes.
        paths = ContainerdPaths.under(Path(tempfile.mkdtemp(prefix="hp-", dir="/tmp")))
        self._paths = paths
        # A script that dies on an exception must not leave a daemon behind.
        atexit.register(self.stop)
        try:
            paths.check_socket_lengths()
            paths.config.write_text(
                render_config(
                    self.flavour, paths, log_level=self.log_level, snapshotter=self.snapshotter
                )
            )
            if self._log_dir is not None:
                self._log_dir.mkdir(parents=True, exist_ok=True)
                name = f"containerd-{self.flavour.name}-{paths.base.name}.log"
                self._log_path = self._log_dir / name
            else:
                self._log_path = paths.base / "containerd.log"
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, *, kill: bool = False) -> None:
        """Stops only the daemon (SIGTERM, or SIGKILL if `kill`) and starts it on the same
        state. Shims keep running, as they do when a real containerd restarts."""
        self._stop_daemon(force=kill)
        self._spawn()

    def stop(self) -> StopReport:
        """Stops the daemon, kills leaked shims, unmounts, removes the temporary directory.

        Idempotent. The report says what had to be cleaned up; a clean test run leaves it
        empty (tests assert `shims()` is empty *before* calling this).
        """
        report = StopReport()
        if self._paths is None:
            return report
        report.daemon_killed = self._stop_daemon(force=False)
        report.leaked_shims = self.shims()
        report.killed_pids, report.removed_sockets = kill_process_trees(report.leaked_shims)
        # What containerd would have done for a dead shim: harpoon's `delete` releases
        # the VM's state, mounts and sockets that live outside our temporary directory.
        for shim in report.leaked_shims:
            if shim.binary == "containerd-shim-harpoon-v1":
                self._delete_harpoon_shim(shim)
        report.deleted_runc_containers = delete_runc_containers_under(self._paths.base)
        bundles = self._bundles()
        report.removed_cgroups = remove_cgroups([b.cgroups_path for b in bundles if b.cgroups_path])
        report.removed_fifos = remove_ctr_fifos([b.container_id for b in bundles])
        report.unmounted = unmount_under(self._paths.base)
        shutil.rmtree(self._paths.base, ignore_errors=True)
        self._paths = None
        atexit.unregister(self.stop)
        self._version = None
        return report

    def _delete_harpoon_shim(self, shim: ShimProcess) -> None:
        namespace, task_id = shim.flag("namespace") or self.namespace, shim.flag("id") or ""
        assert self._paths is not None
        delete_harpoon_task(self.address, task_bundle(self._paths.state, namespace, task_id))

    def __enter__(self) -> Containerd:
        return self.start() if self._paths is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _environment(self) -> dict[str, str]:
        env = daemon_environment([*self.path_prepend, self.flavour.bin_dir], self.snapshotter)
        return env | self.extra_env

    def _spawn(self) -> None:
        paths = self.paths
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.flavour.containerd), "--config", str(paths.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=paths.base,
                # Its own session, so that a ^C aimed at pytest does not kill it before
                # the fixture's finalizer stops it in order.
                start_new_session=True,
            )
        self._wait_ready(started)

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.start_timeout_s
        last_error = "socket not created yet"
        proc = self._proc
        assert proc is not None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ContainerdError(
                    f"containerd {self.flavour.name} exited with status {proc.returncode} "
                    f"during start-up; {self._log_tail()}"
                )
            # ctr retries its dial for seconds when the socket is missing: don't ask yet.
            if self.paths.address.exists():
                result = self.ctr("version", timeout=5.0, check=False)
                if result.returncode == 0:
                    self._version = parse_server_version(result.stdout)
                    return
                last_error = (result.stderr or result.stdout).strip()
            time.sleep(POLL_INTERVAL_S)
        raise ContainerdError(
            f"containerd {self.flavour.name} did not answer `ctr version` within "
            f"{self.start_timeout_s:.0f} s (last error: {last_error}); {self._log_tail()}"
        )

    def _stop_daemon(self, *, force: bool) -> bool:
        """Stops the daemon process; returns True if it had to be SIGKILLed after SIGTERM."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL if force else signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
            return False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return True

    def _bundles(self) -> list[Bundle]:
        """The task bundles still in the state directory (none after a clean test)."""
        bundles = []
        for config in self.paths.state.glob(f"{TASK_BUNDLES}/*/*/config.json"):
            try:
                spec = json.loads(config.read_text())
            except (OSError, ValueError):
                spec = {}
            cgroups_path = (spec.get("linux") or {}).get("cgroupsPath")
            bundles.append(
                Bundle(
                    container_id=config.parent.name,
                    cgroups_path=cgroups_path if isinstance(cgroups_path, str) else None,
                )
            )
        return bundles

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"its log {self._log_path} is unreadable: {e}"
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"last {min(len(lines), LOG_TAIL_LINES)} lines of {self._log_path}:\n{tail}"

    # -- driving it ----------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        input: str | bytes | None = None,
        timeout: float = CTR_TIMEOUT_S,
        check: bool = True,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs this flavour's `ctr --address … --namespace … ARGS` and captures its output.

        With `check`, a non-zero exit raises ContainerdError quoting the command and its
        stderr. Output is decoded as UTF-8 (`input` may be bytes or str).
        """
        cmd = [
            str(self.flavour.ctr),
            "--address",
            self.address,
            "--namespace",
            namespace or self.namespace,
            *args,
        ]
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.run(
            cmd,
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=self._environment(),
            check=False,
        )
        result = subprocess.CompletedProcess(
            cmd,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise ContainerdError(
                f"`{' '.join(cmd)}` exited with status {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def import_image(self, tar_path: Path, *, all_platforms: bool = False) -> str:
        """Imports an OCI image-layout tarball with `ctr image import` and returns the
        image's name: its `io.containerd.image.name` annotation, which 1.6 and 2.x both
        register verbatim (a bare `org.opencontainers.image.ref.name` tag would become
        `import-YYYY-MM-DD:TAG` instead)."""
        expected = _index_image_name(tar_path)
        args = ["image", "import"]
        if all_platforms:
            args.append("--all-platforms")
        self.ctr(*args, str(tar_path), timeout=IMPORT_TIMEOUT_S)
        if expected not in self.image_names():
            raise ContainerdError(
                f"`ctr image import {tar_path}` did not register {expected!r}; "
                f"images now: {self.image_names()}"
            )
        return expected

    def image_names(self) -> list[str]:
        """Names of the images in our namespace (`ctr image ls -q`)."""
        return self.ctr("image", "ls", "-q").stdout.split()

    def containers(self) -> list[str]:
        """IDs of the containers in our namespace (`ctr container ls -q`)."""
        return self.ctr("container", "ls", "-q").stdout.split()

    def tasks(self) -> list[str]:
        """IDs of the tasks in our namespace (the first column of `ctr task ls`)."""
        lines = self.ctr("task", "ls").stdout.splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip()]

    def remove_all_containers(self) -> list[str]:
        """Force-removes every task and container in our namespace (after a failed test,
        so that the next one starts clean); returns the container IDs removed."""
        for task in self.tasks():
            self.ctr("task", "kill", "--signal", "SIGKILL", task, check=False)
            self.ctr("task", "delete", "--force", task, check=False)
        removed = self.containers()
        for container in removed:
            self.ctr("container", "delete", container, check=False)
        return removed

    def shims(self) -> list[ShimProcess]:
        """The containerd-shim-* processes serving this daemon (matched by `-address`)."""
        if self._paths is None:
            return []
        return [p for p in shim_processes() if p.flag("address") == self.address]

    def mounts(self) -> list[str]:
        """Mount points under this daemon's temporary directory (rootfs, snapshots)."""
        if self._paths is None:
            return []
        return [m for m in mount_points() if is_under(m, self._paths.base)]


def daemon_environment(bin_dirs: Sequence[Path], snapshotter: str) -> dict[str, str]:
    """The environment a containerd runs in, and its ctr: `bin_dirs` first on PATH (the
    flavour's own directory right after the caller's: containerd looks shims up on PATH
    before its own directory, and the 2.x daemon must use its own runc shim, not Debian's
    1.6 one in /usr/bin), and nothing that would point ctr or a shim at another daemon."""
    entries = [str(p) for p in bin_dirs]
    entries += os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(os.pathsep)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(dict.fromkeys(e for e in entries if e))
    # ctr and shims honour these; a value inherited from the developer's shell would
    # point them at another daemon.
    for name in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"):
        env.pop(name, None)
    env["CONTAINERD_SNAPSHOTTER"] = snapshotter
    return env


def task_bundle(state_dir: Path, namespace: str, task_id: str) -> Path:
    return state_dir / TASK_BUNDLES / namespace / task_id


def delete_harpoon_task(address: str, bundle: Path) -> None:
    """What containerd does for a harpoon shim it lost: `containerd-shim-harpoon-v1
    delete` (harpoon.shim.cleanup) kills the dead shim's VM and releases its rootfs,
    netns, state and socket. Idempotent; its output (a DeleteResponse) is dropped."""
    namespace, task_id = bundle.parent.name, bundle.name
    subprocess.run(
        [sys.executable, "-m", "harpoon.shim", "-namespace", namespace,
         "-address", address, "-id", task_id, "-bundle", str(bundle), "delete"],
        cwd=bundle if bundle.is_dir() else None, capture_output=True,
        timeout=SHIM_DELETE_TIMEOUT_S, check=False,
    )  # fmt: skip


def parse_server_version(ctr_version_output: str) -> str:
    """The `Version:` of the `Server:` section of `ctr version` output."""
    server = ctr_version_output.split("Server:", 1)
    if len(server) != 2:
        raise ContainerdError(f"`ctr version` printed no Server section: {ctr_version_output!r}")
    match = re.search(r"^\s*Version:\s*(\S+)", server[1], re.MULTILINE)
    if match is None:
        raise ContainerdError(f"`ctr version` printed no server Version: {ctr_version_output!r}")
    return match.group(1)


def _index_image_name(tar_path: Path) -> str:
    """The io.containerd.image.name of the single manifest in an image-layout tarball."""
    with tarfile.open(tar_path) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise ContainerdError(f"{tar_path} has no index.json: not an OCI image layout")
        index = json.load(member)
    names = [
        str(m["annotations"][ANNOTATION_CONTAINERD_NAME])
        for m in index.get("manifests", [])
        if ANNOTATION_CONTAINERD_NAME in (m.get("annotations") or {})
    ]
    if len(names) != 1:
        raise ContainerdError(
            f"{tar_path}: expected one manifest annotated {ANNOTATION_CONTAINERD_NAME}, "
            f"found {names}"
        )
    return names[0]
