"""The daemon's event loop: serves the Task service on the socket `start` bound (fd 3).

It first starts the sandbox of the VM harpoon.shim.daemon launched (or, if none could
be, of none: Create starts one), then loads what serves containerd while the guest
comes up. It exits after Shutdown once it holds no container, or on SIGTERM/SIGINT
after tearing its VM down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from harpoon.sandbox.sandbox import SandboxStarter
from harpoon.shim.cli import Flags
from harpoon.shim.prestart import EarlyStart, prestart
from harpoon.vmm.backend import Backend

if TYPE_CHECKING:
    from harpoon.guest.cache import GuestImage
    from harpoon.shim.task import TaskService
    from harpoon.ttrpc.server import Server

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


def _image_finder(backend: Backend) -> Callable[[], GuestImage]:
    def find_image() -> GuestImage:
        from harpoon.guest import find_guest

        return find_guest(backend.host_arch())

    return find_image


# How long serving containerd may wait for the VM started ahead to get going.
GUEST_HEAD_START_S = 1.0


async def serve(flags: Flags, early: EarlyStart) -> None:
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
    starter = SandboxStarter(early.backend)
    if early.plan is not None:
        prestart(starter, early.plan)
    # The VM first: its start is a few quick steps of ours (connect, load the guest)
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

    publisher = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    service = TaskService(
        flags.namespace,
        publisher,
        starter,
        _image_finder(early.backend),
        stop.set,
        early.plan,
    )
    server = Server()
    impl = _TimedCalls(service) if log.isEnabledFor(logging.DEBUG) else service
    register_service(
        server, shim_pb2.DESCRIPTOR.services_by_name["Task"], impl, names=TASK_SERVICE_NAMES
    )
    from harpoon.api.shim.v1 import guest_pb2
    from harpoon.shim.guest_service import GuestService

    register_service(server, guest_pb2.DESCRIPTOR.services_by_name["Guest"], GuestService(service))
    exit_when_abandoned(server, service, stop.set)
    exit_when_never_used(service, stop.set)
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
    await early.backend.discard_early()
    await publisher.close()
    await server.close()
    serving.cancel()
    with contextlib.suppress(BaseException):
        await serving
    if isinstance(socket_path, str) and socket_path:
        with contextlib.suppress(OSError):
            os.unlink(socket_path)


def exit_when_abandoned(server: Server, service: TaskService, stop: Callable[[], None]) -> None:
    """Stops the daemon once its container is deleted and no client is connected, even
    without a Shutdown: a containerd that lost it (it restarted, its connection broke)
    never sends one, and the daemon would otherwise live for ever. A running container's
    shim stays when containerd goes: a restarted containerd reconnects to it."""

    def idle() -> None:
        if service.abandoned():
            log.info("container deleted and containerd gone: exiting without Shutdown")
            stop()

    server.on_idle(idle)


# containerd sends Create as soon as `start` has answered: a shim still without a
# container this long after starting will never get one. That happens when containerd
# dies between the two: once restarted, it reconnects to the shim (1.6 keeps it as a
# task whose State fails), and nothing would ever end it.
UNUSED_EXIT_S = 30.0


def exit_when_never_used(service: TaskService, stop: Callable[[], None]) -> None:
    """Stops the daemon if it holds no container UNUSED_EXIT_S from now."""

    def check() -> None:
        if service.unused():
            log.info("no container created within %.0f s: exiting", UNUSED_EXIT_S)
            stop()

    asyncio.get_running_loop().call_later(UNUSED_EXIT_S, check)


def run(flags: Flags, early: EarlyStart) -> None:
    asyncio.run(serve(flags, early))
