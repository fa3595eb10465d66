"""The agent's end of the host channel over AF_VSOCK, in a VM that offers no
virtio-serial ports but a virtio vsock device (vfkit's: Virtualization.framework has no
named virtio-serial ports, and vfkit exposes a guest's vsock port to the host as a unix
socket, `virtio-vsock,port=N,socketURL=PATH,connect`).

The same ttrpc Server serves it as the ports: the agent listens on AGENT_VSOCK_PORT and
STDIO_VSOCK_PORT (any CID), both bound before either is served, so that once the host
has its Hello answered on the agent port the stdio port is listening too (the host
connects it then: harpoon.sandbox.agent_client). Every accepted connection is served,
concurrently: a host that reconnects after a drop gets a new connection. The old one
lingers, idle, until the VM ends: vfkit does not pass a host-side close on to the guest
(VZ's connection has no CloseWrite; the double does as vfkit does).

vfkit dials the guest's port for each connection made to its unix socket and closes
that connection if nobody listens (the host sees EOF and connects again): there is no
connection to wait for before the agent listens, unlike a virtio-serial port.
"""

from __future__ import annotations

import asyncio
import socket

from harpoon.agent import boot, modules
from harpoon.ttrpc.server import Server

#: A virtio device's `device` attribute for a socket device (the virtio spec's id 19).
VIRTIO_ID_VSOCK = "0x0013"
#: The virtio transport of AF_VSOCK, with `vsock` and `vmw_vsock_virtio_transport_common`
#: under it (Debian's 6.1 kernel builds them as modules: CONFIG_VIRTIO_VSOCKETS=m).
TRANSPORT_MODULE = "vmw_vsock_virtio_transport"
LISTEN_BACKLOG = 8


def has_vsock_device(devices_dir: str | None = None) -> bool:
    return boot.has_virtio_device(VIRTIO_ID_VSOCK, devices_dir or boot.VIRTIO_DEVICES_DIR)


def load_transport() -> None:
    """Loads AF_VSOCK and its virtio transport (which probes the device) if not loaded."""
    modules.load(TRANSPORT_MODULE)


def listen_vsock(port: int) -> socket.socket:
    """A stream socket listening on `port` at any of the guest's CIDs."""
    return listen(socket.AF_VSOCK, (socket.VMADDR_CID_ANY, port))


def listen(family: int, address: tuple[int, int] | str) -> socket.socket:
    """A stream socket of `family` bound to `address` and listening (AF_UNIX in tests:
    nothing below depends on the family)."""
    listener = socket.socket(family, socket.SOCK_STREAM)  # not inherited (PEP 446)
    try:
        listener.bind(address)
        listener.listen(LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


async def serve(server: Server, listeners: list[socket.socket]) -> None:
    """Serves every connection to each listener (already listening: the caller binds
    them all first) until the server closes or a listener fails."""
    try:
        await asyncio.gather(*(server.serve(listener) for listener in listeners))
    finally:
        for listener in listeners:
            listener.close()
