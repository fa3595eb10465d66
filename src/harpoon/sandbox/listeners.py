"""Ports of a user-mode VM (gvproxy) published on the host: the ones asked for
(`publish`), or, for a container sharing the host's network, its listeners
(`forward`): published on the host's loopback, as Lima and Docker
Desktop publish a guest's: what listens in the guest's own network namespace (the
agent's ListeningPorts) is exposed by the VM's gvproxy on 127.0.0.1 at the same port,
and unexposed once it stops listening. Polled every POLL_S: the guest has no way to
announce a new listener, and an RPC a second is little beside a container's work.

A host port something else holds is not published; the next poll tries again (it
may have been freed), logging once per port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from harpoon import procnet
from harpoon.errdefs import FailedPrecondition
from harpoon.net.gvproxy_api import GvproxyApi, GvproxyError
from harpoon.net.ports import PublishedPort

if TYPE_CHECKING:
    from harpoon.sandbox.agent_client import AgentClient

log = logging.getLogger(__name__)

POLL_S = 0.5
HOST_ADDRESS = "127.0.0.1"

Port = tuple[str, int]


async def publish(api: GvproxyApi, ports: tuple[PublishedPort, ...]) -> None:
    """Publishes each port; FailedPrecondition naming the first that cannot be (its
    host port in use), the others published before it left to go with the VM."""
    for port in ports:
        try:
            await asyncio.to_thread(
                api.expose, port.protocol, port.host_address, port.host_port, port.container_port
            )
        except GvproxyError as error:
            raise FailedPrecondition(f"cannot publish {port}: {error}") from None


def changes(published: set[Port], listening: set[Port]) -> tuple[set[Port], set[Port]]:
    """What to expose and what to unexpose, to make published equal listening."""
    return listening - published, published - listening


def host_ports() -> frozenset[Port]:
    """What listens on this host's loopback or at a wildcard address (any UDP port: a
    host's service may have any), which a container sharing the host's network reaches
    at 127.0.0.1 (harpoon.agent.loopback)."""
    return frozenset(procnet.listening_ports(local=True))


class Forwarder:
    """Keeps a user-mode VM's listeners published (and the guest told of the host's:
    harpoon.agent.loopback) while `run` runs.

    It polls every POLL_S, and at once when `caught_up` asks: the process's output goes
    through `caught_up` on its way to the host (harpoon.shim.process), so a port the
    container listens on before it prints is published before the print is seen,
    which is when a client that waits for "listening…" connects."""

    def __init__(
        self, agent: AgentClient, api: GvproxyApi, name: str, host_known: set[Port] | None
    ) -> None:
        self.agent, self.api, self.name = agent, api, name
        self.host_known = host_known
        self.published: set[Port] = set()
        self._refused: set[Port] = set()
        self._asked = 0
        self._done = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._ended = False

    async def caught_up(self) -> None:
        """Returns once a sync that began after this call has ended (or the forwarder
        has: its VM is going)."""
        self._asked += 1
        wanted = self._asked
        self._wake.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._done >= wanted or self._ended)

    async def run(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                self._wake.clear()
                covered = self._asked  # every caller so far asked before this sync
                if not await self._sync():
                    return
                async with self._progress:
                    self._done = covered
                    self._progress.notify_all()
        finally:
            self._ended = True
            with contextlib.suppress(RuntimeError):  # its loop is closing
                async with self._progress:
                    self._progress.notify_all()

    async def _sync(self) -> bool:
        """One round; False once the guest no longer answers."""
        try:
            listening = await self.agent.listening_ports()
            if self.host_known is not None:
                now = set(host_ports())
                if now != self.host_known:
                    await self.agent.set_host_ports(now)
                    self.host_known = now
        except Exception as error:  # the VM is going: its gvproxy goes with it
            log.debug("%s: no listeners to publish: %s", self.name, error)
            return False
        expose, unexpose = changes(self.published, listening)
        for protocol, port in sorted(unexpose):
            try:
                await asyncio.to_thread(self.api.unexpose, protocol, HOST_ADDRESS, port)
            except GvproxyError as error:
                log.warning("%s: unpublishing %s port %d: %s", self.name, protocol, port, error)
            self.published.discard((protocol, port))
        for protocol, port in sorted(expose):
            try:
                await asyncio.to_thread(self.api.expose, protocol, HOST_ADDRESS, port, port)
            except GvproxyError as error:
                if (protocol, port) not in self._refused:
                    log.warning("%s: publishing %s port %d on %s: %s",
                                self.name, protocol, port, HOST_ADDRESS, error)  # fmt: skip
                    self._refused.add((protocol, port))
                continue
            self.published.add((protocol, port))
            log.info("%s: %s port %d published on %s", self.name, protocol, port, HOST_ADDRESS)
        self._refused &= listening
        return True
