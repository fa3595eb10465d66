"""Releasing what a container held on the host, and `shim delete`.

`delete` runs after every teardown and after a shim died: it must find the VM's state
directory from the flags alone, kill a VMM the dead shim left behind
(harpoon.vmm.leftovers), unmount the rootfs, remove the sockets, print a DeleteResponse
and be quick and idempotent.

containerd runs it for every container, after the shim has gone, and waits for it: it
is a fresh Python on the critical path of `ctr run --rm`. So it imports almost nothing
(no pathlib, no protobuf: the DeleteResponse is written by hand, harpoon.shim.wire) and
looks before it loads what cleaning up would need: after a clean shutdown there is
nothing left to do.
"""

from __future__ import annotations

import os
import sys
import time

from harpoon.shim import paths, wire
from harpoon.shim.cli import Flags
from harpoon.vmm.leftovers import SIGKILL, kill_recorded, kill_vmm

KILLED_EXIT_STATUS = 128 + SIGKILL


def _mounted_under(paths_: tuple[str, ...]) -> bool:
    """Whether anything is mounted at or below one of paths (without loading libc)."""
    prefixes = [os.fsencode(p.rstrip("/")) for p in paths_]
    try:
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            for line in mountinfo:
                point = line.split(b" ", 5)[4]
                if any(point == p or point.startswith(p + b"/") for p in prefixes):
                    return True
    except OSError:
        return True
    return False


def release_host_resources(namespace: str, container_id: str, bundle: str) -> int:
    """Kills the VM, unmounts the rootfs, removes the network namespace harpoon made and
    the state and share directories; returns the VM pid."""
    state_dir = paths.vm_state_dir_str(namespace, container_id)
    share = paths.share_dir_str(namespace, container_id)
    rootfs = os.path.join(bundle, "rootfs")
    pid = kill_vmm(state_dir)
    # After a clean shutdown there is nothing left: look before loading what releases.
    if os.path.lexists(share):
        from pathlib import Path

        from harpoon.sandbox import rootfs as rootfs_share

        rootfs_share.release(Path(share))
    if _mounted_under((rootfs,)):
        from pathlib import Path

        from harpoon.shim.bundle import unmount_rootfs

        unmount_rootfs(Path(rootfs))
    netns = paths.netns_path_str(namespace, container_id)
    if os.path.lexists(netns):
        from pathlib import Path

        from harpoon.net import netns as namespaces

        namespaces.remove(Path(netns))
    if os.path.lexists(state_dir):
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)
    return pid


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid, exit_status, exited_at}."""
    return (
        wire.varint_field(1, pid)
        + wire.varint_field(2, exit_status)
        + wire.message_field(3, wire.timestamp(exited_at_ns))
    )


def kill_daemon(bundle: str, container_id: str) -> None:
    """Ends the container's daemon if it still runs: containerd runs `delete` when it has
    lost the shim (it never got Shutdown), and a daemon left then would live for ever,
    its VM an unreaped zombie. Only a process whose command line is this container's
    shim is killed; its VM dies with it (a parent-death signal)."""
    task_id = os.fsencode(container_id)

    def is_its_shim(argv: list[bytes]) -> bool:
        return any(b"containerd-shim-harpoon" in arg for arg in argv[:2]) and task_id in argv

    kill_recorded(os.path.join(bundle, paths.DAEMON_PID_FILE), is_its_shim)


def delete_command(flags: Flags) -> int:
    bundle = flags.bundle or os.getcwd()
    # The daemon removes the VM's state directory last when it deletes its container
    # (after the poststop hooks): if it is still there, the daemon died before that,
    # and its hooks are run here, as runc's `delete --force` runs them (nerdctl's
    # poststop releases the container's name, address and port rules).
    unfinished = os.path.lexists(paths.vm_state_dir_str(flags.namespace, flags.id))
    kill_daemon(bundle, flags.id)
    pid = release_host_resources(flags.namespace, flags.id, bundle)
    if unfinished:
        from harpoon.shim import hooks

        failure = hooks.run_bundle_poststop(bundle)
        if failure is not None:
            print(f"poststop hooks of {flags.id}: {failure}", file=sys.stderr)
    socket = paths.socket_path_str(flags.address, flags.namespace, flags.id)
    try:
        # `start` recorded the address it chose (2.3+ may have named another directory).
        with open(os.path.join(bundle, "address")) as recorded:
            socket = recorded.read().strip().removeprefix("unix://")
    except OSError:
        pass
    try:  # noqa: SIM105
        os.unlink(socket)
    except FileNotFoundError:
        pass
    sys.stdout.buffer.write(delete_response(pid, KILLED_EXIT_STATUS, time.time_ns()))
    sys.stdout.flush()
    return 0
