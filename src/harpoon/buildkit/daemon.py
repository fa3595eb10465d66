"""One buildkitd process: started on a layout (harpoon.buildkit.config), ready once it
serves, stopped by its pid file from any process.

`start_buildkitd` writes its configuration, starts it in a session of its own (a ^C
meant for whoever started it does not reach it; it outlives that process, as the front
door's services must), with its output appended to a log file and its TMPDIR in its
run directory, and returns once `buildctl debug workers` lists its worker.
`stop_buildkitd` ends it (SIGTERM, SIGKILL after STOP_TIMEOUT_S) and removes what it
leaves: sockets, pid file, the CNI leases of "cni" mode, the mounts of the steps it
ran if it died mid-build (clean_up); and the CNI bridge of "cni" mode, which CNI's
bridge plugin never removes. The next start cleans up
the run directory first, so a buildkitd that was killed is cleaned up after either
way. Its `root` (the build cache) is kept.

It never touches a buildkitd it did not start: a pid file is believed only while that
process runs buildkitd with this layout's configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harpoon import linux, private
from harpoon.buildkit.config import (
    BuildkitdLayout,
    BuildkitdSettings,
    render_buildkitd_config,
    render_cni_config,
)

#: From start to `buildctl debug workers` answering (~0.5 s here; it connects to
#: containerd and reads its snapshotter's state first).
START_TIMEOUT_S = 60.0
#: How long buildkitd gets to exit after SIGTERM (it waits for no build).
STOP_TIMEOUT_S = 15.0
#: One `buildctl debug workers` while waiting for it.
PROBE_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.1
LOG_TAIL_BYTES = 4096


class BuildkitdError(RuntimeError):
    """buildkitd did not start or serve; the message quotes its log."""


@dataclass(frozen=True)
class BuildkitBinaries:
    """The buildkitd and buildctl to run (harpoon.devenv.tools.BUILDKIT builds them)."""

    buildkitd: Path
    buildctl: Path

    def buildctl_command(self, layout: BuildkitdLayout, *args: str) -> list[str]:
        """`buildctl --addr unix://… ARGS` for the buildkitd of `layout`."""
        return [str(self.buildctl), "--addr", layout.address, *args]


def running_pid(layout: BuildkitdLayout) -> int | None:
    """The pid of the buildkitd running on `layout`, from its pid file; None if none is
    (no file, or its process is gone or is not that buildkitd: a reused pid)."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _runs_layout(pid, layout) else None


def _runs_layout(pid: int, layout: BuildkitdLayout) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and os.fsencode(layout.config) in argv


def start_buildkitd(
    binaries: BuildkitBinaries,
    settings: BuildkitdSettings,
    layout: BuildkitdLayout,
    log_path: Path,
    *,
    path_prepend: tuple[Path, ...] = (),
    timeout_s: float = START_TIMEOUT_S,
) -> int:
    """Starts buildkitd on `layout` and returns its pid once it serves; BuildkitdError
    (and nothing left running) if it does not within timeout_s. One that already runs
    on `layout` is an error: stop it first."""
    running = running_pid(layout)
    if running is not None:
        raise BuildkitdError(f"buildkitd {running} already runs on {layout.run_dir}: stop it first")
    clean_up(layout)
    private.directory(layout.run_dir)
    private.directory(layout.root)
    private.directory(layout.tmp)
    private.write_file(layout.config, render_buildkitd_config(settings, layout).encode())
    if settings.cni is not None:
        private.write_file(layout.cni_config, render_cni_config(settings.cni, layout).encode())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(layout.tmp))
    if path_prepend:
        env["PATH"] = os.pathsep.join([*map(str, path_prepend), env.get("PATH", "")])
    with open(private.open_file(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log:
        process = subprocess.Popen(
            [str(binaries.buildkitd), "--config", str(layout.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    private.write_file(layout.pid_file, f"{process.pid}\n".encode())
    try:
        _wait_ready(binaries, layout, process, log_path, timeout_s)
    except BaseException:
        stop_buildkitd(layout)
        process.wait()
        raise
    return process.pid


def _wait_ready(
    binaries: BuildkitBinaries,
    layout: BuildkitdLayout,
    process: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    last = "its socket is not there yet"
    while time.monotonic() < deadline:
        status = process.poll()
        if status is not None:
            raise BuildkitdError(
                f"buildkitd exited with status {status} while starting; {_log_tail(log_path)}"
            )
        if layout.socket.exists():
            probe = subprocess.run(
                binaries.buildctl_command(layout, "debug", "workers"),
                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
            )  # fmt: skip
            # A header line and one line per worker.
            if probe.returncode == 0 and len(probe.stdout.strip().splitlines()) > 1:
                return
            last = (probe.stderr or probe.stdout).strip() or "no worker listed"
        time.sleep(POLL_INTERVAL_S)
    raise BuildkitdError(
        f"buildkitd did not serve within {timeout_s:.0f} s ({last}); {_log_tail(log_path)}"
    )


def stop_buildkitd(layout: BuildkitdLayout, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stops the buildkitd running on `layout` and cleans up after it (clean_up);
    returns whether one was running. Idempotent."""
    pid = running_pid(layout)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, layout, timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, layout, timeout_s)
        # Reaped here if this process started it (else init reaps it).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    clean_up(layout)
    remove_cni_bridge(layout)
    return pid is not None


def remove_cni_bridge(layout: BuildkitdLayout) -> None:
    """Deletes the bridge layout's CNI network list names, if it is there and no
    buildkitd runs on layout."""
    if running_pid(layout) is not None:
        return
    try:
        document = json.loads(layout.cni_config.read_text())
        bridge = str(document["plugins"][0]["bridge"])
    except (OSError, ValueError, LookupError, TypeError):
        return
    if bridge and Path("/sys/class/net", bridge).exists():
        subprocess.run(["ip", "link", "delete", "dev", bridge], capture_output=True, check=False)


def _wait_gone(pid: int, layout: BuildkitdLayout, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _runs_layout(pid, layout):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def clean_up(layout: BuildkitdLayout) -> None:
    """What a buildkitd that is no longer running left: its sockets and pid file, and
    the mounts it made and would have undone (found after a SIGKILL mid-RUN): a step's
    snapshot (`<root>/containerd-overlayfs/cachemounts/*`), a CNI step's network
    namespace (`<root>/net/cni/*`), a root filesystem in its TMPDIR. The step's
    container and task stay in containerd (buildkitd labels them not: they are the
    only containers of its runtime with no image and no snapshot) with its VM running
    on, unharmed: it holds bind mounts of its own. Does nothing while one runs on
    `layout`."""
    if running_pid(layout) is not None:
        return
    if layout.root.exists():
        # A buildkitd that stopped cleanly left none: each is a step's, undone after it.
        linux.unmount_all(str(layout.root))
    if not layout.run_dir.exists():
        return
    if layout.tmp.exists():
        linux.unmount_all(str(layout.tmp))
        # Never a tree with a mount left in it: that would delete a snapshot's files.
        if not linux.mounts_under(str(layout.tmp)):
            shutil.rmtree(layout.tmp, ignore_errors=True)
    for path in (*layout.sockets, layout.pid_file):
        path.unlink(missing_ok=True)
    shutil.rmtree(layout.cni_ipam, ignore_errors=True)


def _log_tail(log_path: Path) -> str:
    try:
        with log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            tail = log.read().decode(errors="replace")
    except OSError as error:
        return f"its log {log_path} is unreadable: {error}"
    return f"the end of its log {log_path}:\n{tail}"
