"""The vsock ports' host sockets, bridged to the guest's vsock through vhost-device-vsock.

On a Mac there is no host AF_VSOCK: vfkit exposes each `--device virtio-vsock` port as a
unix socket (vfkit pkg/vf/vsock.go, through inetaf/tcpproxy):
- `connect` (host->guest): vfkit listens on socketURL; for each connection it accepts it
  dials the guest's port (VZ's connectToPort); when that dial fails the accepted
  connection is closed (tcpproxy's DialProxy onDialError), so the host sees EOF;
- `listen` (guest->host): vfkit listens on the guest's port; for each guest connection it
  dials socketURL, where the host program must be listening; if that fails the guest's
  connection is closed.
Then bytes are copied both ways, each direction on its own (tcpproxy proxyCopy), and
both connections close once both directions have ended. The end of the guest's side
half-closes the host's connection (closeWrite on a unix socket); the end of the host's
side is NOT passed on to the guest: VZ's vsock connection (Code-Hex/vz socket.go
VirtioSocketConnection) has no CloseWrite, so tcpproxy's closeWrite does nothing there.
A host that closes its connection is therefore noticed by the guest only once the
guest writes to it (the write fails on the host's side, that direction ends, both
connections close) or closes it itself.
vfkit exposes the sockets once the VM is Running (cmd/vfkit/main.go runVirtualMachine)
and a socket path that already exists is an error it logs and goes on without
(net.ListenUnix fails; vfkit warns "error exposing vsock port"); the listener's socket
file is removed when vfkit exits (Go unlinks the sockets it listens on at Close).

Here the guest's vsock is real: QEMU's vhost-user-vsock device served by rust-vmm's
vhost-device-vsock, whose host end is a unix socket (`uds`) speaking Firecracker's
hybrid vsock: to reach guest port P, connect to `uds`, send "CONNECT P\\n", read
"OK <host port>\\n" (no answer but EOF when nothing listens on P in the guest); a guest
connecting to the host's port P is passed to whoever listens on `uds`_P.

Difference from vfkit: a dial to the guest gets DIAL_TIMEOUT_S (tcpproxy's default dial
timeout, which vfkit's DialContext ignores) to be answered, so a guest whose vsock driver
never comes up cannot pin connections forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from harpoon.devenv.vfkit_double.devices import VirtioVsock
from harpoon.devenv.vfkit_double.serving import accept_forever, close

log = logging.getLogger("vfkit")

#: tcpproxy's DialProxy default: how long a guest gets to accept a host connection.
DIAL_TIMEOUT_S = 10.0
#: The longest "OK <port>\n" answer worth reading.
MAX_REPLY_BYTES = 64
COPY_CHUNK_BYTES = 64 * 1024
LISTEN_BACKLOG = 16
#: Unix socket paths on macOS hold 103 bytes (sockaddr_un's 104 with the NUL); binding a
#: longer one fails there, so it fails here too.
MAX_UNIX_PATH_BYTES = 103


class HandshakeError(ConnectionError):
    """vhost-device-vsock did not answer CONNECT with OK: nothing listens on that port."""


def connect_request(port: int) -> bytes:
    """The hybrid-vsock request for guest port `port`."""
    return f"CONNECT {port}\n".encode()


def parse_connect_reply(line: bytes) -> int:
    """The host-side port of an "OK <port>\\n" answer; HandshakeError for anything else."""
    words = line.decode("ascii", errors="replace").split()
    if line.endswith(b"\n") and len(words) == 2 and words[0] == "OK" and words[1].isdigit():
        return int(words[1])
    if not line:
        raise HandshakeError("the guest closed the connection: is anything listening?")
    raise HandshakeError(f"unexpected answer to CONNECT: {line[:MAX_REPLY_BYTES]!r}")


def listen_unix(path: str) -> socket.socket:
    """A listening unix socket at path, refused as Go's net.ListenUnix refuses it on a Mac
    (an existing file, a path too long): OSError."""
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        raise OSError(f"listen unix {path}: bind: invalid argument (longer than macOS allows)")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        raise OSError(f"listen unix {path}: bind: {error.strerror or error}") from None
    return listener


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, half_close: bool
) -> None:
    """One direction until its end (EOF, or an error on either side, which ends only
    this direction, as io.Copy's does); then the writer is half-closed if `half_close`."""
    try:
        while data := await reader.read(COPY_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    if half_close and writer.can_write_eof() and not writer.is_closing():
        with contextlib.suppress(OSError):
            writer.write_eof()


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def splice(host: Streams, guest: Streams) -> None:
    """Copies both ways until both directions end, then closes both (tcpproxy
    HandleConn). The guest's EOF half-closes the host's side; the host's is not passed on."""
    try:
        async with asyncio.TaskGroup() as directions:
            directions.create_task(_pump(host[0], guest[1], half_close=False))
            directions.create_task(_pump(guest[0], host[1], half_close=True))
    finally:
        await close(guest[1])
        await close(host[1])


async def dial_guest(uds: Path, port: int) -> Streams:
    """A connection to guest port `port` through vhost-device-vsock, handshake done."""
    reader, writer = await asyncio.open_unix_connection(str(uds))
    try:
        writer.write(connect_request(port))
        await writer.drain()
        async with asyncio.timeout(DIAL_TIMEOUT_S):
            line = await reader.readline()
        parse_connect_reply(line)
    except BaseException:
        await close(writer)
        raise
    return reader, writer


class ExposedPort:
    """One vsock port's host socket and its bridge: `serve` until cancelled, then
    `remove` the socket file (as Go's listener does when vfkit exits)."""

    def __init__(self, device: VirtioVsock, uds: Path) -> None:
        self.device = device
        self.uds = uds
        self.listener: socket.socket | None = None
        self._paths: list[str] = []

    def open(self) -> None:
        """Binds the listening socket: socketURL for `connect`, the uds_PORT that
        vhost-device-vsock dials for `listen` (OSError as vfkit's listen would fail)."""
        path = (
            self.device.socket_url if not self.device.listen else f"{self.uds}_{self.device.port}"
        )
        self.listener = listen_unix(path)
        self._paths.append(path)

    async def serve(self) -> None:
        assert self.listener is not None, "open() first"
        handler = self._to_guest if not self.device.listen else self._to_host
        await accept_forever(self.listener, handler)

    async def _to_guest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            guest = await dial_guest(self.uds, self.device.port)
        except (OSError, TimeoutError) as error:
            log.debug("vsock port %d: dial failed: %s", self.device.port, error)
            return  # the accepted connection is closed: the host sees EOF
        await splice(host=(reader, writer), guest=guest)

    async def _to_host(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host = await asyncio.open_unix_connection(self.device.socket_url)
        except OSError as error:
            log.debug("vsock port %d: dial %s failed: %s", self.device.port,
                      self.device.socket_url, error)  # fmt: skip
            return  # the guest's connection is closed
        await splice(host=host, guest=(reader, writer))

    def remove(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
