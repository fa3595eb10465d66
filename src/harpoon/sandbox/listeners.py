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


async def forward(
    agent: AgentClient, api: GvproxyApi, name: str, host_known: set[Port] | None = None
) -> None:
    """Keeps the guest's listeners published until cancelled, and the guest told of the
    host's (host_known: what it was last told); leaves the ports published (the VM's
    gvproxy, and every port it holds, go with the VM)."""
    published: set[Port] = set()
    refused: set[Port] = set()
    while True:
        try:
            listening = await agent.listening_ports()
            if host_known is not None:
                now = set(host_ports())
                if now != host_known:
                    await agent.set_host_ports(now)
                    host_known = now
        except Exception as error:  # the VM is going: its gvproxy goes with it
            log.debug("%s: no listeners to publish: %s", name, error)
            return
        expose, unexpose = changes(published, listening)
        for protocol, port in sorted(unexpose):
            try:
                await asyncio.to_thread(api.unexpose, protocol, HOST_ADDRESS, port)
            except GvproxyError as error:
                log.warning("%s: unpublishing %s port %d: %s", name, protocol, port, error)
            published.discard((protocol, port))
        for protocol, port in sorted(expose):
            try:
                await asyncio.to_thread(api.expose, protocol, HOST_ADDRESS, port, port)
            except GvproxyError as error:
                if (protocol, port) not in refused:
                    log.warning("%s: publishing %s port %d on %s: %s",
                                name, protocol, port, HOST_ADDRESS, error)  # fmt: skip
                    refused.add((protocol, port))
                continue
            published.add((protocol, port))
            log.info("%s: %s port %d published on %s", name, protocol, port, HOST_ADDRESS)
        refused &= listening
        await asyncio.sleep(POLL_S)
