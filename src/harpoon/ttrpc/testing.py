"""Test support: a Server and a Client joined by a socketpair, no filesystem needed.

For tests of anything served over ttrpc (the Task service, the agent). Production code
must never import it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from harpoon.ttrpc.channel import READ_CHUNK_BYTES
from harpoon.ttrpc.client import Client
from harpoon.ttrpc.server import Server


@asynccontextmanager
async def connected_client(server: Server) -> AsyncIterator[Client]:
    """A Client whose connection ``server`` serves; both ends are closed on exit."""
    server_sock, client_sock = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=server_sock, limit=READ_CHUNK_BYTES)
    serving = asyncio.create_task(server.serve_connection(reader, writer))
    client_reader, client_writer = await asyncio.open_connection(
        sock=client_sock, limit=READ_CHUNK_BYTES
    )
    client = Client(client_reader, client_writer)
    try:
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(serving, timeout=5)
