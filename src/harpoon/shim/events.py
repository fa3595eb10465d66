"""Publishes task events to containerd, in order, through its ttrpc Events/Forward.

One queue, one sender: an event is published only after every event queued before
it, which is what gives containerd create → start → exit → delete. A failed send is
retried (with backoff) before the next one goes, as containerd's own publisher does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from harpoon.api.containerd.services.events.ttrpc.v1 import events_pb2
from harpoon.ttrpc.client import Client
from harpoon.ttrpc.status import TtrpcError

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
PUBLISH_TIMEOUT_S = 5.0
# containerd's own shim publisher's schedule: 5 attempts, waiting 1, 2, 3, 4 s between
# them, so an event outlives a containerd restart of ~10 s (its exits are what CRI and
# `ctr events` subscribers wait for).
PUBLISH_ATTEMPTS = 5
RETRY_STEP_S = 1.0
QUEUE_LIMIT = 2048

log = logging.getLogger(__name__)


def envelope(namespace: str, topic: str, event: Message) -> events_pb2.Envelope:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    # containerd 1.6 resolves the type by its exact full name: no type.googleapis.com/.
    packed = any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
    return events_pb2.Envelope(timestamp=stamp, namespace=namespace, topic=topic, event=packed)


class EventPublisher:
    def __init__(self, ttrpc_address: str, namespace: str) -> None:
        self.address = ttrpc_address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[events_pb2.Envelope | None] = asyncio.Queue(QUEUE_LIMIT)
        self._client: Client | None = None
        self._sender: asyncio.Task[None] | None = None

    def publish(self, topic: str, event: Message) -> None:
        """Queues an event; it is sent after every event queued before it."""
        if not self.address:
            log.warning("no TTRPC_ADDRESS: dropping event %s", topic)
            return
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all())
        self._queue.put_nowait(envelope(self.namespace, topic, event))

    async def _send_all(self) -> None:
        while (item := await self._queue.get()) is not None:
            await self._send(item)
            self._queue.task_done()
        self._queue.task_done()

    async def _send(self, item: events_pb2.Envelope) -> None:
        request = events_pb2.ForwardRequest(envelope=item).SerializeToString()
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect_unix(self.address)
                await self._client.call(
                    EVENTS_SERVICE, "Forward", request, timeout=PUBLISH_TIMEOUT_S
                )
                return
            except (OSError, TtrpcError, TimeoutError) as error:
                log.warning("publishing %s failed (attempt %d): %s", item.topic, attempt, error)
                if self._client is not None:
                    with contextlib.suppress(Exception):
                        await self._client.close()
                    self._client = None
                if attempt < PUBLISH_ATTEMPTS:
                    await asyncio.sleep(attempt * RETRY_STEP_S)
        log.error("dropped event %s after %d attempts", item.topic, PUBLISH_ATTEMPTS)

    async def flush(self, timeout: float = PUBLISH_TIMEOUT_S * 2) -> None:
        """Waits until every queued event has been sent (or given up on)."""
        if self._sender is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)

    async def close(self) -> None:
        await self.flush()
        if self._sender is not None:
            self._queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sender, 1.0)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
