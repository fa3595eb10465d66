"""Where a shim keeps things on the host, computed the same way by every process.

`start`, the daemon and `delete` (which may run after the daemon was killed) must
agree on the shim socket and the VM's state directory from the CLI flags alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SOCKET_DIR = Path("/run/containerd/s")
RUN_DIR = Path(os.environ.get("HARPOON_RUN_DIR", "/run/harpoon"))
UNIX_SOCKET_PATH_MAX_BYTES = 106


def socket_path(grpc_address: str, namespace: str, group: str, socket_dir: str = "") -> Path:
    """containerd's convention: sha256 of <address>/<namespace>/<id> under /run/containerd/s."""
    digest = hashlib.sha256(os.path.join(grpc_address, namespace, group).encode()).hexdigest()
    path = Path(socket_dir or SOCKET_DIR) / digest
    if len(str(path).encode()) > UNIX_SOCKET_PATH_MAX_BYTES:
        path = SOCKET_DIR / digest
    return path


def vm_state_dir(namespace: str, container_id: str) -> Path:
    """The VM's private directory (sockets, pid file, console log) for one container."""
    digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:24]
    return RUN_DIR / "vm" / digest
