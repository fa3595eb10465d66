"""The agent's end of the host channel: the virtio-serial port named harpoon.agent.

Without udev there are no friendly names in /dev: the port is the /dev/vportNpM whose
/sys/class/virtio-ports entry has our name. The port reads EOF while no host is
connected, so the caller reopens it in a loop; a port can only be open once.
"""

from __future__ import annotations

import asyncio
import os

from harpoon.api.names import AGENT_PORT_NAME

PORTS_DIR = "/sys/class/virtio-ports"
PORT_WAIT_S = 10.0
PORT_POLL_S = 0.005


def find_port(name: str = AGENT_PORT_NAME) -> str | None:
    try:
        entries = os.listdir(PORTS_DIR)
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(PORTS_DIR, entry, "name")) as port_name:
                if port_name.read().strip() == name:
                    return "/dev/" + entry
        except OSError:
            continue
    return None


async def wait_for_port(name: str = AGENT_PORT_NAME) -> str:
    """The device path of the named port, once the driver has created it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PORT_WAIT_S
    while (path := find_port(name)) is None or not os.path.exists(path):
        if loop.time() > deadline:
            raise RuntimeError(f"no virtio-serial port named {name!r} after {PORT_WAIT_S} s")
        await asyncio.sleep(PORT_POLL_S)
    return path


class _WriteHalfProtocol(asyncio.streams.FlowControlMixin):
    """The protocol of a port's write half, which asyncio has no stream class for.

    StreamWriter.wait_closed asks its protocol for a close waiter, which only
    StreamReaderProtocol has (FlowControlMixin raises NotImplementedError, which took
    PID 1 down when a host disconnected). And the port can be opened again only once
    both halves' descriptors are closed, so losing this half closes the read half too.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, read_half: asyncio.BaseTransport):
        super().__init__(loop=loop)
        self._read_half = read_half
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._read_half.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


async def open_port(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Opens a character device as an asyncio stream pair; closing the writer closes
    the device."""
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    reader = asyncio.StreamReader(limit=1 << 22, loop=loop)
    read_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    read_half, _ = await loop.connect_read_pipe(
        lambda: read_protocol, os.fdopen(fd, "rb", buffering=0)
    )
    write_transport, write_protocol = await loop.connect_write_pipe(
        lambda: _WriteHalfProtocol(loop, read_half),
        os.fdopen(os.dup(fd), "wb", buffering=0),
    )
    writer = asyncio.StreamWriter(write_transport, write_protocol, reader, loop)
    return reader, writer
