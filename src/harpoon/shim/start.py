"""`shim start`: bind the task socket, spawn the daemon on it, print the address.

Order matters: the socket is listening before the address is printed (containerd
connects at once and the backlog holds it until the daemon accepts), and the daemon
inherits none of our stdio, because containerd reads our output until EOF.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

from harpoon.shim import paths
from harpoon.shim.bootstrap import parse_start_stdin, start_output
from harpoon.shim.cli import Flags

LISTENER_FD = 3


def _bind(path: Path) -> socket.socket | None:
    """A listening socket at path, or None if a live shim already serves it."""
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    for _ in range(2):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
        except OSError as error:
            listener.close()
            if error.errno != errno.EADDRINUSE:
                raise
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                return None  # a running shim owns it: share it
            except OSError:
                path.unlink(missing_ok=True)  # stale socket of a dead shim
            finally:
                probe.close()
            continue
        os.chmod(path, 0o600)
        listener.listen(128)
        return listener
    raise OSError(errno.EADDRINUSE, f"cannot bind shim socket {path}")


def _daemon_command() -> list[str]:
    """Ourselves again: the shim script when we were started as one (so `ps` and
    containerd's tooling see containerd-shim-harpoon-v1), else the module."""
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script).startswith("containerd-shim-") and os.path.isfile(script):
        return [sys.executable, script]
    return [sys.executable, "-m", "harpoon.shim"]


def start(flags: Flags) -> int:
    data = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    parsed = parse_start_stdin(data, flags.id)
    params = parsed.params
    namespace = flags.namespace or (params.namespace if params else "")
    task_id = flags.id or (params.instance_id if params else "")
    grpc_address = flags.address or (params.containerd_grpc_address if params else "")
    if not namespace or not task_id:
        print("start needs -namespace and -id", file=sys.stderr)
        return 2
    socket_dir = params.socket_dir if params is not None and params.HasField("socket_dir") else ""
    path = paths.socket_path(grpc_address, namespace, task_id, socket_dir)
    address = f"unix://{path}"
    listener = _bind(path)
    if listener is not None:
        Path("address").write_text(address)
        env = dict(os.environ)
        if params is not None and params.containerd_ttrpc_address and "TTRPC_ADDRESS" not in env:
            env["TTRPC_ADDRESS"] = params.containerd_ttrpc_address
        argv = [
            *_daemon_command(),
            "-namespace",
            namespace,
            "-id",
            task_id,
            "-address",
            grpc_address,
        ]
        if flags.publish_binary:
            argv += ["-publish-binary", flags.publish_binary]
        if flags.debug:
            argv.append("-debug")
        if listener.fileno() != LISTENER_FD:
            os.dup2(listener.fileno(), LISTENER_FD)
        os.set_inheritable(LISTENER_FD, True)
        try:
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(LISTENER_FD,),
                env=env,
                start_new_session=True,
            )
        except OSError:
            path.unlink(missing_ok=True)
            raise
    sys.stdout.buffer.write(start_output(address, params))
    sys.stdout.flush()
    return 0
