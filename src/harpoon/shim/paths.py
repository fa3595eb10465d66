"""Where a shim keeps things on the host, computed the same way by every process.

`start`, the daemon and `delete` (which may run after the daemon was killed) must
agree on the shim socket and the VM's state directory from the CLI flags alone.

`start` and `delete` run in a fresh Python on every container's critical path, so this
module loads pathlib only when a caller asks for a Path (the `*_str` forms do not).
"""

from __future__ import annotations

import os
import sys

from harpoon import dirs

TYPE_CHECKING = False  # not typing's: importing typing costs more than this module
if TYPE_CHECKING:
    from hashlib import sha256
    from pathlib import Path
# hashlib's sha256 without hashlib, which loads OpenSSL's libcrypto (~2 ms of each
# `start` and `delete`): CPython's own implementation, the same digests.
elif sys.version_info >= (3, 12):
    from _sha2 import sha256
else:
    from _sha256 import sha256

SOCKET_DIR = "/run/containerd/s"
RUN_DIR = dirs.run_dir()
UNIX_SOCKET_PATH_MAX_BYTES = 106
# In the bundle (the shim's working directory): the daemon's pid, as runc's shim keeps it.
DAEMON_PID_FILE = "shim.pid"


def _path(value: str) -> Path:
    from pathlib import Path

    return Path(value)


def socket_path_str(grpc_address: str, namespace: str, group: str, socket_dir: str = "") -> str:
    """containerd's convention: sha256 of <address>/<namespace>/<id> under /run/containerd/s."""
    digest = sha256(os.path.join(grpc_address, namespace, group).encode()).hexdigest()
    path = os.path.join(socket_dir or SOCKET_DIR, digest)
    if len(path.encode()) > UNIX_SOCKET_PATH_MAX_BYTES:
        path = os.path.join(SOCKET_DIR, digest)
    return path


def socket_path(grpc_address: str, namespace: str, group: str, socket_dir: str = "") -> Path:
    return _path(socket_path_str(grpc_address, namespace, group, socket_dir))


def _container_digest(namespace: str, container_id: str) -> str:
    return sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:24]


def vm_state_dir_str(namespace: str, container_id: str) -> str:
    """The VM's private directory (sockets, pid file, console log) for one container."""
    return os.path.join(RUN_DIR, "vm", _container_digest(namespace, container_id))


def vm_state_dir(namespace: str, container_id: str) -> Path:
    return _path(vm_state_dir_str(namespace, container_id))


def share_dir_str(namespace: str, container_id: str) -> str:
    """The directory the VM exports as its rootfs share (harpoon.sandbox.rootfs); apart
    from the state directory, so that no recursive removal of that reaches the rootfs."""
    return os.path.join(RUN_DIR, "share", _container_digest(namespace, container_id))


def share_dir(namespace: str, container_id: str) -> Path:
    return _path(share_dir_str(namespace, container_id))


def netns_path_str(namespace: str, container_id: str) -> str:
    """The network namespace harpoon makes for a container whose spec asks for a new one
    (harpoon.net.netns): its VM runs there, and CNI's hooks configure it."""
    return os.path.join(RUN_DIR, "netns", _container_digest(namespace, container_id))


def netns_path(namespace: str, container_id: str) -> Path:
    return _path(netns_path_str(namespace, container_id))
