"""The host ends of a guest's ports: unix sockets the VMM listens on.

A restored guest must find its host attached when it runs (see
harpoon.vmm.base.VirtualMachine), so these are connected before the guest is let go,
and before the ttrpc client and protobuf that talk over them are loaded (the guest's
resume and that import then overlap).
"""

from __future__ import annotations

import asyncio

CONNECT_ATTEMPTS = 200
CONNECT_RETRY_S = 0.005
# A whole frame of process output fits in one read.
READ_LIMIT_BYTES = 1 << 22

Port = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect_port(socket_path: str) -> Port:
    # The VMM binds its socket a moment before it listens on it.
    for _ in range(CONNECT_ATTEMPTS - 1):
        try:
            return await asyncio.open_unix_connection(socket_path, limit=READ_LIMIT_BYTES)
        except ConnectionRefusedError:
            await asyncio.sleep(CONNECT_RETRY_S)
    return await asyncio.open_unix_connection(socket_path, limit=READ_LIMIT_BYTES)


async def connect_ports(control_path: str, stdio_path: str | None) -> tuple[Port, Port | None]:
    """The control port and, if the VM has one, the stdio port; both or neither."""
    control = await connect_port(control_path)
    if stdio_path is None:
        return control, None
    try:
        return control, await connect_port(stdio_path)
    except BaseException:
        control[1].close()
        raise
