"""What a dead shim's VMM leaves on the host, and ending it: for `shim delete`.

`delete` runs in a fresh Python on the critical path of every `ctr run --rm`, and may
run after the shim was killed: it must find the VMM from the VM's state directory
alone. So this module imports nothing but os and time, and the pid file's name lives
here, beside the function that reads it (every backend writes its VMM's pid there).

On macOS this is what ends the VMM of a shim killed with SIGKILL (there is no
parent-death signal: harpoon.vmm.qemu_launch): with no /proc there, a process's command
line and state come from `ps` (its command column joins argv with spaces).
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # not typing's: `delete` imports this module on its critical path
if TYPE_CHECKING:
    from collections.abc import Callable

PID_FILE_NAME = "vmm.pid"
# harpoon.vmm.virtiofsd.PID_PREFIX (not imported: see above).
HELPER_PID_PREFIX = "virtiofsd-"
# harpoon.net.gvproxy.GvproxyConfig.pid_file's name (gvproxy writes it itself).
GVPROXY_PID_FILE = "gvproxy.pid"
SIGKILL = 9  # not signal's: importing signal costs more than this module
VMM_EXIT_WAIT_S = 2.0
VMM_EXIT_POLL_S = 0.01
#: Whether processes are read from /proc (Linux) or from `ps` (macOS).
HAS_PROC = os.path.isdir("/proc/self")


def kill_vmm(state_dir: str) -> int:
    """Kills the VMM whose pid file is in state_dir, if it still runs and is that VM's
    (its command line names state_dir); returns its pid, or 0."""
    name = os.fsencode(state_dir)
    pid = kill_recorded(
        os.path.join(state_dir, PID_FILE_NAME), lambda argv: any(name in arg for arg in argv)
    )
    kill_helpers(state_dir)
    return pid


def kill_helpers(state_dir: str) -> None:
    """Kills the VMM's helpers recorded in state_dir (a virtiofsd per virtiofs share:
    harpoon.vmm.virtiofsd; a gvproxy per user-mode NIC), after the VMM: with QEMU gone
    they exit by themselves, but one whose QEMU never connected would wait forever."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return
    for name in names:
        if name.startswith(HELPER_PID_PREFIX) and name.endswith(".pid"):
            kill_recorded(os.path.join(state_dir, name), _is_virtiofsd)
        elif name == GVPROXY_PID_FILE:
            kill_recorded(os.path.join(state_dir, name), _is_gvproxy)


def _is_gvproxy(argv: list[bytes]) -> bool:
    return bool(argv) and os.path.basename(argv[0]).startswith(b"gvproxy")


def _is_virtiofsd(argv: list[bytes]) -> bool:
    return bool(argv) and os.path.basename(argv[0]).startswith(b"virtiofsd")


def kill_recorded(pid_file: str, is_it: Callable[[list[bytes]], bool]) -> int:
    """Kills (and waits for) the process whose pid pid_file records, if it still runs
    and `is_it` says its command line is the one meant (pids are reused); never this
    process. Returns the recorded pid, or 0 when there is none."""
    try:
        with open(pid_file) as recorded:
            pid = int(recorded.read().strip())
    except (OSError, ValueError):
        return 0
    argv = _argv(pid)
    if argv is None:
        return pid  # gone already
    if pid != os.getpid() and is_it(argv):
        kill_and_wait(pid)
    return pid


def kill_and_wait(pid: int) -> None:
    """SIGKILLs pid, a process that is not our child, and waits (a bounded while) until
    it is gone or a zombie: dead, whoever reaps it."""
    try:
        os.kill(pid, SIGKILL)
    except ProcessLookupError:
        return
    # Not our child: no pidfd to wait on without more imports.
    deadline = time.monotonic() + VMM_EXIT_WAIT_S
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(VMM_EXIT_POLL_S)


def _argv(pid: int) -> list[bytes] | None:
    """pid's command line, None when there is no such process."""
    if not HAS_PROC:
        line = _ps(pid, "command")
        # The whole line too: an argument with a space in it is split by ps's column.
        return None if line is None else [*line.split(b" "), line]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")
    except OSError:
        return None


def _running(pid: int) -> bool:
    if not HAS_PROC:
        state = _ps(pid, "stat")
        return state is not None and not state.startswith(b"Z")
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _ps(pid: int, column: str) -> bytes | None:
    """One column of `ps` for pid (where there is no /proc), None when it is gone."""
    import subprocess  # not at import: Linux's `delete` never pays for it

    try:
        done = subprocess.run(
            # -ww: the whole command line (ps cuts it to a width otherwise; macOS and procps)
            ["ps", "-ww", "-o", f"{column}=", "-p", str(pid)],
            capture_output=True,
            check=False,
        )
    except OSError:
        return None
    line = done.stdout.strip()
    return line if done.returncode == 0 and line else None
