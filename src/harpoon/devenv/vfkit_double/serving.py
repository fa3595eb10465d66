"""Accepting connections on a listening socket, each handled by a task the server owns.

asyncio's start_server leaves every connection's task to the loop; here they live in a
TaskGroup, so that cancelling the server ends its connections too (structured: nothing
outlives the VM that served it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def accept_forever(listener: socket.socket, handler: Handler) -> None:
    """Accepts on `listener` (a bound, listening stream socket) until cancelled; each
    connection runs `handler` with its streams, and is closed when it returns."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    async with asyncio.TaskGroup() as connections:
        while True:
            accepted, _ = await loop.sock_accept(listener)
            connections.create_task(_serve(accepted, handler))


async def _serve(accepted: socket.socket, handler: Handler) -> None:
    if accepted.family == socket.AF_UNIX:
        reader, writer = await asyncio.open_unix_connection(sock=accepted)
    else:
        reader, writer = await asyncio.open_connection(sock=accepted)
    try:
        await handler(reader, writer)
    except (ConnectionError, TimeoutError):
        pass  # the peer went away: its connection only
    finally:
        await close(writer)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
