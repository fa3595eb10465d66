"""The long-running shim: serves the Task service on the socket `start` bound (fd 3).

It logs to the bundle's `log` FIFO (containerd copies it into its own log) and exits
after Shutdown once it holds no container, or on SIGTERM/SIGINT after tearing its VM
down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from harpoon.api.containerd.task.v2 import shim_pb2
from harpoon.shim.cli import Flags
from harpoon.shim.events import EventPublisher
from harpoon.shim.task import TaskService
from harpoon.ttrpc.server import Server
from harpoon.ttrpc.service import register_service

LISTENER_FD = 3
TASK_SERVICE_NAMES = ("containerd.task.v2.Task", "containerd.task.v3.Task")

log = logging.getLogger("harpoon.shim")


def _log_to_fifo(debug: bool) -> None:
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass  # no reader (containerd gone): log to whatever stderr is
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if debug else logging.INFO,
        format="time=%(asctime)s level=%(levelname)s msg=%(message)s runtime=harpoon",
    )


def _find_image() -> object:
    from harpoon.guest import find_guest
    from harpoon.vmm.qemu import host_arch

    return find_guest(host_arch())


async def serve(flags: Flags) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(fileno=LISTENER_FD)
    socket_path = listener.getsockname()
    stop = asyncio.Event()
    from harpoon.vmm.qemu import QemuVM

    publisher = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    service = TaskService(flags.namespace, publisher, QemuVM, _find_image, stop.set)
    server = Server()
    register_service(
        server, shim_pb2.DESCRIPTOR.services_by_name["Task"], service, names=TASK_SERVICE_NAMES
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGPIPE, lambda: None)
    serving = asyncio.ensure_future(server.serve(listener))
    log.info("serving %s for %s/%s", socket_path, flags.namespace, flags.id)
    await stop.wait()
    log.info("shutting down")
    await service.close()
    await publisher.close()
    await server.close()
    serving.cancel()
    with contextlib.suppress(BaseException):
        await serving
    if isinstance(socket_path, str) and socket_path:
        with contextlib.suppress(OSError):
            os.unlink(socket_path)


def run_daemon(flags: Flags) -> int:
    # Not a child subreaper (runc's shim is one for its runc init): our only children
    # are VMMs we wait for, and orphans of theirs are better left to init to reap.
    _log_to_fifo(flags.debug)
    asyncio.run(serve(flags))
    return 0
