"""`shim start`: bind the task socket, fork the daemon on it, print the address.

Order matters: the socket is listening before the address is printed (containerd
connects at once and the backlog holds it until the daemon accepts), and the daemon
keeps none of our stdio, because containerd reads our output until EOF.

The daemon is a fork of this process, not a re-executed one (Go shims re-exec because
Go cannot fork): it skips a second interpreter start-up, and it begins starting the
container's VM while containerd is still reading our answer (harpoon.shim.daemon). This
module imports little: it runs on every container's critical path.
"""

from __future__ import annotations

import errno
import os
import sys
import time

# The C module under `socket`, whose Python half costs `start` enum, selectors and more.
from _socket import AF_UNIX, SOCK_STREAM
from _socket import socket as Socket

from harpoon import private
from harpoon.shim import paths
from harpoon.shim.bootstrap import BootstrapParams, parse_start_stdin, start_output
from harpoon.shim.cli import Flags

LISTENER_FD = 3


def _bind(path: str) -> Socket | None:
    """A listening socket at path, or None if a live shim already serves it."""
    # The socket is the container's whole Task API: root's alone, in a directory that
    # is too (runc's shim makes it 0600 and its sockets 0600).
    private.directory(os.path.dirname(path))
    for _ in range(2):
        listener = Socket(AF_UNIX, SOCK_STREAM)
        try:
            private.bind(listener, path)
        except OSError as error:
            listener.close()
            if error.errno != errno.EADDRINUSE:
                raise
            probe = Socket(AF_UNIX, SOCK_STREAM)
            try:
                probe.connect(path)
                return None  # a running shim owns it: share it
            except OSError:
                try:  # noqa: SIM105 (contextlib is one import more for `start`)
                    os.unlink(path)  # stale socket of a dead shim
                except FileNotFoundError:
                    pass
            finally:
                probe.close()
            continue
        listener.listen(128)
        return listener
    raise OSError(errno.EADDRINUSE, f"cannot bind shim socket {path}")


def _become_daemon(listener: Socket, flags: Flags, ttrpc_address: str) -> None:
    """The forked child: detaches from containerd's `start` call and serves. Never returns."""
    status = 1
    try:
        os.setsid()
        # containerd reads our stdout and stderr until EOF: let go of them at once.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        if listener.fileno() != LISTENER_FD:
            os.dup2(listener.fileno(), LISTENER_FD)
            listener.close()
        else:
            listener.detach()
        if ttrpc_address and "TTRPC_ADDRESS" not in os.environ:
            os.environ["TTRPC_ADDRESS"] = ttrpc_address
        from harpoon.shim.daemon import run_daemon

        status = run_daemon(flags)
    finally:
        # Never unwind into the parent's code (its stdout buffer, its exit status).
        os._exit(status)


def _daemon_flags(flags: Flags, namespace: str, task_id: str, grpc_address: str) -> Flags:
    daemon = Flags()
    daemon.namespace, daemon.id, daemon.address = namespace, task_id, grpc_address
    daemon.publish_binary, daemon.debug = flags.publish_binary, flags.debug
    daemon.started_at = flags.started_at
    daemon.bundle = os.getcwd()  # containerd runs `start` in the bundle
    return daemon


def _backend_refused() -> str | None:
    """Why the user's choice of VMM backend cannot be followed (a bad $HARPOON_VMM or
    config file), checked before a daemon is forked: the user reads it from ctr or
    nerdctl rather than in a dead daemon's log. None when it can."""
    # The choice alone (os, and tomllib for a config file), not the backends' modules:
    # their imports would delay start's answer to containerd; the daemon loads them.
    from harpoon.vmm.choice import BACKEND_NAMES, BackendChoiceError, choose

    try:
        choose(BACKEND_NAMES)
    except BackendChoiceError as error:
        return f"harpoon: {error}"
    return None


def start(flags: Flags) -> int:
    data = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    parsed = parse_start_stdin(data, flags.id)
    params: BootstrapParams | None = parsed.params
    namespace = flags.namespace or (params.namespace if params else "")
    task_id = flags.id or (params.instance_id if params else "")
    grpc_address = flags.address or (params.containerd_grpc_address if params else "")
    if not namespace or not task_id:
        print("start needs -namespace and -id", file=sys.stderr)
        return 2
    if (refused := _backend_refused()) is not None:
        print(refused, file=sys.stderr)  # containerd shows it: "failed to start shim: …"
        return 1
    socket_dir = params.socket_dir if params is not None else None
    path = paths.socket_path_str(grpc_address, namespace, task_id, socket_dir or "")
    address = f"unix://{path}"
    listener = _bind(path)
    if listener is not None:
        private.write_file("address", address.encode())
        sys.stdout.flush()
        daemon_flags = _daemon_flags(flags, namespace, task_id, grpc_address)
        daemon_flags.forked_at = time.time()
        try:
            child = os.fork()
        except OSError:
            os.unlink(path)
            raise
        if child == 0:
            ttrpc_address = params.containerd_ttrpc_address if params is not None else ""
            _become_daemon(listener, daemon_flags, ttrpc_address)
        listener.close()
        # As runc's shim does: `delete` ends a daemon that containerd lost (harpoon.shim.cleanup).
        private.write_file(paths.DAEMON_PID_FILE, str(child).encode())
    sys.stdout.buffer.write(start_output(address, params))
    sys.stdout.flush()
    return 0
