"""The shim's event publisher against a containerd that fails its Forwards for a while:
each event is retried on containerd's own schedule, then dropped, and the events
keep their order."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from harpoon.api.containerd.events import task_pb2 as events
from harpoon.api.containerd.services.events.ttrpc.v1 import events_pb2
from harpoon.errdefs import Unavailable
from harpoon.shim import events as publisher_module
from harpoon.shim.events import PUBLISH_ATTEMPTS, EventPublisher
from harpoon.ttrpc.server import CallContext, Server
from harpoon.ttrpc.service import register_service


class Containerd:
    """containerd's Events service, failing its first `failures` Forwards (as while it
    restarts): what it took, in order."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.topics: list[str] = []

    async def Forward(
        self, request: events_pb2.ForwardRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        if self.failures:
            self.failures -= 1
            raise Unavailable("containerd is restarting")
        self.topics.append(request.envelope.topic)
        return empty_pb2.Empty()


def publish_two(tmp_path: Path, containerd: Containerd, sleeps: list[float]) -> None:
    path = tmp_path / "containerd.sock.ttrpc"
    original: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def no_wait(delay: float, *args: object) -> None:
        sleeps.append(delay)
        await original(0)

    async def scenario() -> None:
        server = Server()
        register_service(server, events_pb2.DESCRIPTOR.services_by_name["Events"], containerd)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen()
        serving = asyncio.ensure_future(server.serve(listener))
        publisher = EventPublisher(f"unix://{path}", "default")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(publisher_module.asyncio, "sleep", no_wait)
            publisher.publish("/tasks/exit", events.TaskExit(container_id="c1", exit_status=3))
            publisher.publish("/tasks/delete", events.TaskDelete(container_id="c1"))
            await publisher.flush()
        await publisher.close()
        await server.close()
        serving.cancel()

    asyncio.run(scenario())


def test_an_event_waits_out_four_failures_on_containerds_schedule(tmp_path: Path) -> None:
    containerd, sleeps = Containerd(failures=PUBLISH_ATTEMPTS - 1), []
    publish_two(tmp_path, containerd, sleeps)
    assert containerd.topics == ["/tasks/exit", "/tasks/delete"]
    assert sleeps == [1.0, 2.0, 3.0, 4.0]  # ~10 s: containerd's own shim publisher's


def test_an_event_is_dropped_after_five_failures_and_the_next_still_goes(
    tmp_path: Path,
) -> None:
    containerd, sleeps = Containerd(failures=PUBLISH_ATTEMPTS), []
    publish_two(tmp_path, containerd, sleeps)
    assert containerd.topics == ["/tasks/delete"]
    assert sleeps == [1.0, 2.0, 3.0, 4.0]
