"""The guest agent's main loop, PID 1 in every harpoon VM (started by harpoon.agent.boot,
once the filesystems are mounted and the boot modules loaded).

It serves the Agent ttrpc service on the host channel for as long as the VM lives,
reaps every child (it is init), and powers the VM off rather than exit: an init that
exits panics the kernel, and a silent agent would leave the host waiting.

The host channel is whatever the VM offers, the same ttrpc either way: the virtio-serial
ports harpoon.agent and harpoon.stdio (QEMU: harpoon.agent.channel), or, in a VM without
them that has a virtio vsock device (vfkit), AF_VSOCK ports (harpoon.agent.vsock).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Literal

from harpoon.agent import channel, vsock
from harpoon.agent.console import log
from harpoon.agent.processes import ProcessTable
from harpoon.agent.service import AgentService, power_off
from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.names import (
    AGENT_PORT_NAME,
    AGENT_VSOCK_PORT,
    STDIO_PORT_NAME,
    STDIO_VSOCK_PORT,
)
from harpoon.ttrpc.server import Server
from harpoon.ttrpc.service import register_service

RECONNECT_PAUSE_S = 0.02

Transport = Literal["virtio-serial", "vsock"]


async def serve(started_monotonic: float) -> None:
    loop = asyncio.get_running_loop()
    table = ProcessTable()
    loop.add_signal_handler(signal.SIGCHLD, table.reap)
    table.reap()
    server = Server()
    register_service(
        server,
        agent_pb2.DESCRIPTOR.services_by_name["Agent"],
        AgentService(table, started_monotonic),
    )
    if transport() == "vsock":
        await serve_vsock(server)
    else:
        # The agent port first: the host's first request (Hello) comes on it.
        await asyncio.gather(
            serve_port(server, AGENT_PORT_NAME), serve_port(server, STDIO_PORT_NAME)
        )


def transport() -> Transport:
    """The host channel this VM offers: its virtio-serial ports if it has them, else its
    vsock device if it has one, else the ports still (serve_port waits for them to be
    named, and says so if they never are).

    By now the boot modules have probed every virtio device and the agent's imports
    took long enough for the host to have named its ports (QEMU names them as the
    driver comes up); a VM of harpoon's QEMU backend has no vsock device anyway."""
    if channel.find_port(AGENT_PORT_NAME) is None and vsock.has_vsock_device():
        return "vsock"
    return "virtio-serial"


async def serve_vsock(server: Server) -> None:
    """Serves the host channel on AF_VSOCK, both ports bound before either is served."""
    vsock.load_transport()
    listeners = [vsock.listen_vsock(AGENT_VSOCK_PORT), vsock.listen_vsock(STDIO_VSOCK_PORT)]
    log(f"serving vsock ports {AGENT_VSOCK_PORT} and {STDIO_VSOCK_PORT}")
    await vsock.serve(server, listeners)


async def serve_port(server: Server, name: str) -> None:
    """Serves one host channel for ever: each time the host (re)connects."""
    path = await channel.wait_for_port(name)
    port = channel.hold_port(path)
    log(f"serving {name} on {path}")
    while True:
        reader, writer = await channel.open_port(port)
        try:
            await server.serve_connection(reader, writer)
        finally:
            writer.close()
        # EOF: no host on the other end (yet, or any more). Wait for one.
        await asyncio.sleep(RECONNECT_PAUSE_S)


def main() -> None:
    started = time.monotonic()
    try:
        asyncio.run(serve(started))
    except BaseException:
        import traceback  # only on the way down

        traceback.print_exc()
        log("fatal error, powering off")
        power_off()
