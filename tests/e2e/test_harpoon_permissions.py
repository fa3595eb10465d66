"""What harpoon keeps on the host for a container is root's alone (harpoon.private).

A running container's VM state directory (QMP, agent and stdio sockets, console log,
pid file, the VMM's log), its rootfs share, the shim's socket and what the shim wrote
into the bundle, and the roots they live in (the run directory with its caches, the
template store) must give no access to group or other, and belong to root: another
user of the host who reached any of them could drive the VM, read the guest's memory
or console, or read and write the container's files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.guest import find_guest
from harpoon.sandbox.rootfs import ROOTFS_NAME
from harpoon.sandbox.template import TemplateStore
from harpoon.shim import paths
from harpoon.vmm.base import PID_FILE_NAME
from tests.e2e.test_harpoon_run import RUN_TIMEOUT_S, delete_once_stopped, start_sleeper

pytestmark = pytest.mark.vm

# What only the owner may have: none of group's or other's read, write or search.
SHARED_BITS = stat.S_IRWXG | stat.S_IRWXO


def loose(path: Path) -> str | None:
    """Why path is reachable by someone other than root, or None if it is not."""
    info = os.lstat(path)
    if info.st_uid != 0:
        return f"{path} belongs to uid {info.st_uid}"
    if info.st_mode & SHARED_BITS:
        return f"{path} is {stat.filemode(info.st_mode)}"
    return None


def writable_by_others(path: Path) -> str | None:
    """Why someone other than root could change path, or None if nobody can."""
    info = os.lstat(path)
    if info.st_uid != 0:
        return f"{path} belongs to uid {info.st_uid}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is {stat.filemode(info.st_mode)}"
    return None


def harpoons_paths_for(containerd: Containerd, container_id: str, bundle: Path) -> list[Path]:
    """Every host path harpoon made or uses for the running container."""
    run_dir = Path(paths.RUN_DIR)
    state_dir = paths.vm_state_dir(containerd.namespace, container_id)
    share = paths.share_dir(containerd.namespace, container_id)
    socket = paths.socket_path(containerd.address, containerd.namespace, container_id)
    found = [run_dir, state_dir.parent, share.parent, share, socket.parent, socket]
    # The caches beside them (the accelerator's verdict, QEMU's machine types).
    found += [entry for entry in run_dir.iterdir() if entry.is_file()]
    found += [state_dir, *state_dir.iterdir()]
    found += [bundle / "address", bundle / paths.DAEMON_PID_FILE]
    store = TemplateStore.from_environment()
    if store is not None and store.root.exists():
        found += [store.root, *(entry for entry in store.root.iterdir() if entry.is_dir())]
    return found


def test_everything_harpoon_keeps_for_a_container_is_roots_alone(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    start_sleeper(containerd, busybox_image, container_id)
    try:
        [shim] = [s for s in containerd.shims() if s.flag("id") == container_id]
        bundle = Path(os.readlink(f"/proc/{shim.pid}/cwd"))
        state_dir = paths.vm_state_dir(containerd.namespace, container_id)
        share = paths.share_dir(containerd.namespace, container_id)
        checked = harpoons_paths_for(containerd, container_id, bundle)
        # The walk saw the VM's sockets and files, not an empty directory.
        names = {p.name for p in checked if p.parent == state_dir}
        assert {
            "agent.sock",
            "stdio.sock",
            "vmm.sock",
            "console.log",
            "vmm.log",
            PID_FILE_NAME,
        } <= names
        # The share holds the container's rootfs, mounted there: its own files have
        # the image's modes (the container's business), the export around it is ours.
        assert os.listdir(share) == [ROOTFS_NAME]
        reachable = [reason for reason in map(loose, checked) if reason]
        assert not reachable, "reachable by others:\n" + "\n".join(reachable)
        # The guest image may be read by all (public packages and harpoon's own code,
        # nothing of a container's), but written by root alone: every VM boots it.
        guest = find_guest()
        image = [guest.kernel.parent, guest.kernel, guest.initrd]
        assert [reason for reason in map(writable_by_others, image) if reason] == []
    finally:
        containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id, check=False)
        delete_once_stopped(containerd, container_id, 137, "the sleeper outlived SIGKILL")


def test_the_containers_own_files_keep_their_modes_and_users_behind_root_only_state(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    """The export around the rootfs is root's alone, but the container sees only its
    rootfs: a process of another user still reads and writes there, and what the guest
    creates has the modes and owner it asked for (QEMU runs with umask 077, which must
    not cut them: it sets them itself)."""
    start_sleeper(containerd, busybox_image, container_id)
    try:
        # The other user by su, not `ctr task exec --user`: after such an exec under
        # containerd 1.6 (which looks the user up in the container's snapshot), creating
        # a file in a directory of the image's layer fails with ENOENT, under runc too.
        as_nobody = "ls / >/dev/null && cat /by-root && echo nobody > /tmp/by-nobody && id -u"
        script = (
            "umask 022 && echo root > /by-root && mkdir /dir-by-root && "
            f"su -s /bin/sh -c '{as_nobody}' nobody"
        )
        done = containerd.ctr(
            "task", "exec", "--exec-id", "files", container_id, "sh", "-c", script,
            timeout=RUN_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "root\n65534\n"), done.stderr
        rootfs = paths.share_dir(containerd.namespace, container_id) / ROOTFS_NAME
        made = {
            name: (stat.S_IMODE(info.st_mode), info.st_uid)
            for name in ("by-root", "dir-by-root", "tmp/by-nobody")
            for info in [os.lstat(rootfs / name)]
        }
        assert made == {
            "by-root": (0o644, 0),
            "dir-by-root": (0o755, 0),
            "tmp/by-nobody": (0o644, 65534),
        }
    finally:
        containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id, check=False)
        delete_once_stopped(containerd, container_id, 137, "the sleeper outlived SIGKILL")
