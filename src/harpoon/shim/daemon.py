"""The long-running shim: serves the Task service on the socket `start` bound (fd 3).

It logs to the bundle's `log` FIFO (containerd copies it into its own log) and exits
after Shutdown once it holds no container, or on SIGTERM/SIGINT after tearing its VM
down.

Its first act is to start the container's VM from the bundle (harpoon.shim.prestart):
the VMM launches before the modules that serve containerd are even imported, and the
guest comes up while containerd connects and sends Create, which then takes the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from harpoon.shim.cli import Flags

if TYPE_CHECKING:
    from harpoon.guest.cache import GuestImage
    from harpoon.sandbox.sandbox import SandboxStarter

LISTENER_FD = 3
TASK_SERVICE_NAMES = ("containerd.task.v2.Task", "containerd.task.v3.Task")

log = logging.getLogger("harpoon.shim")


class _TimedCalls:
    """The Task service with every call's arrival and duration logged (debug only)."""

    def __init__(self, service: object) -> None:
        self._service = service

    def __getattr__(self, name: str) -> object:
        method = getattr(self._service, name)
        if not name[:1].isupper() or not callable(method):
            return method

        async def timed(request: object, ctx: object) -> object:
            began = time.monotonic()
            log.debug("call %s received", name)
            try:
                return await method(request, ctx)
            finally:
                log.debug("call %s answered in %.1f ms", name, (time.monotonic() - began) * 1e3)

        return timed


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


def _find_image() -> GuestImage:
    from harpoon.guest import find_guest
    from harpoon.vmm.qemu import host_arch

    return find_guest(host_arch())


def _prestart(flags: Flags) -> SandboxStarter:
    """The sandbox starter, already starting the bundle's VM if it can."""
    from harpoon.sandbox.sandbox import SandboxStarter
    from harpoon.shim import prestart
    from harpoon.vmm.qemu import QemuVM

    starter = SandboxStarter(QemuVM)
    try:
        image = _find_image()
    except Exception as error:  # Create reports a missing guest image
        log.info("not starting the VM ahead: %s", error)
        return starter
    prestart.prestart(starter, flags.namespace, flags.id, flags.bundle or os.getcwd(), image)
    return starter


# How long serving containerd may wait for the VM started ahead to get going.
GUEST_HEAD_START_S = 1.0


async def serve(flags: Flags) -> None:
    began = time.monotonic()
    if flags.forked_at:
        log.debug(
            "start process: main at %.6f, forked at %.6f; daemon up at %.6f",
            flags.started_at, flags.forked_at, time.time(),
        )  # fmt: skip
    loop = asyncio.get_running_loop()
    listener = socket.socket(fileno=LISTENER_FD)
    socket_path = listener.getsockname()
    stop = asyncio.Event()
    starter = _prestart(flags)
    # The VM first: its start is a few quick steps of ours (launch QEMU, connect, load)
    # between waits for QEMU, then the guest runs for a while on its own. The modules
    # that serve containerd (protobuf's generated code above all) are imported then,
    # and the service is ready before the guest is (containerd's Create waits in the
    # socket's backlog meanwhile).
    await starter.wait_guest_running(GUEST_HEAD_START_S)

    from harpoon.api.containerd.task.v2 import shim_pb2
    from harpoon.shim.events import EventPublisher
    from harpoon.shim.task import TaskService
    from harpoon.ttrpc.server import Server
    from harpoon.ttrpc.service import register_service
    from harpoon.vmm.qemu import QemuVM

    publisher = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    service = TaskService(flags.namespace, publisher, QemuVM, _find_image, stop.set, starter)
    server = Server()
    impl = _TimedCalls(service) if log.isEnabledFor(logging.DEBUG) else service
    register_service(
        server, shim_pb2.DESCRIPTOR.services_by_name["Task"], impl, names=TASK_SERVICE_NAMES
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGPIPE, lambda: None)
    serving = asyncio.ensure_future(server.serve(listener))
    log.info(
        "serving %s for %s/%s (ready in %.0f ms)",
        socket_path, flags.namespace, flags.id, (time.monotonic() - began) * 1e3,
    )  # fmt: skip
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
