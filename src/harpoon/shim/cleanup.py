"""Releasing what a container held on the host, and `shim delete`.

`delete` runs after every teardown and after a shim died: it must find the VM's state
directory from the flags alone, kill a VMM the dead shim left behind, unmount the
rootfs, remove the sockets, print a DeleteResponse and be quick and idempotent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from google.protobuf import timestamp_pb2

from harpoon.api.containerd.task.v2 import shim_pb2
from harpoon.shim import paths
from harpoon.shim.bundle import unmount_rootfs
from harpoon.shim.cli import Flags

KILLED_EXIT_STATUS = 128 + signal.SIGKILL


def kill_vmm(state_dir: Path) -> int:
    """Kills the VMM recorded in state_dir (if it still runs); returns its pid or 0."""
    try:
        pid = int((state_dir / "vmm.pid").read_text().strip())
    except (OSError, ValueError):
        return 0
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    if str(state_dir).encode() not in cmdline:
        return pid  # the pid was reused by an unrelated process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.01)
    return pid


def release_host_resources(namespace: str, container_id: str, bundle: Path) -> int:
    """Kills the VM, unmounts the rootfs, removes the state directory; returns the VM pid."""
    state_dir = paths.vm_state_dir(namespace, container_id)
    pid = kill_vmm(state_dir)
    unmount_rootfs(bundle / "rootfs")
    shutil.rmtree(state_dir, ignore_errors=True)
    return pid


def delete_command(flags: Flags) -> int:
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    pid = release_host_resources(flags.namespace, flags.id, bundle)
    socket = paths.socket_path(flags.address, flags.namespace, flags.id)
    with contextlib.suppress(OSError):
        # `start` recorded the address it chose (2.3+ may have named another directory).
        socket = Path((bundle / "address").read_text().strip().removeprefix("unix://"))
    socket.unlink(missing_ok=True)
    exited_at = timestamp_pb2.Timestamp()
    exited_at.FromNanoseconds(time.time_ns())
    response = shim_pb2.DeleteResponse(pid=pid, exit_status=KILLED_EXIT_STATUS, exited_at=exited_at)
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0
