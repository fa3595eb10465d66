"""The vfkit double's vsock sockets, bridged over the hybrid-vsock handshake: against a
stand-in for vhost-device-vsock's host socket that speaks the same protocol (the real
one, with a guest behind it, is tests/vm/test_vfkit_double.py's)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from harpoon.devenv.vfkit_double import vsock
from harpoon.devenv.vfkit_double.devices import VirtioVsock
from harpoon.devenv.vfkit_double.vsock import ExposedPort, HandshakeError

ECHO_PORT = 1025
TIMEOUT_S = 10.0


def test_the_handshake_is_firecrackers() -> None:
    assert vsock.connect_request(1025) == b"CONNECT 1025\n"
    assert vsock.parse_connect_reply(b"OK 1073741824\n") == 1073741824
    for answer in (b"", b"OK\n", b"NO 5\n", b"OK 12"):
        with pytest.raises(HandshakeError):
            vsock.parse_connect_reply(answer)


#: How long the stand-in guest listens for an EOF that must not come.
NO_EOF_WINDOW_S = 0.3


async def hybrid_vsock(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """vhost-device-vsock's host socket with a guest that listens on ECHO_PORT only: it
    echoes up to an "END" line, then reports whether an EOF followed, and closes (a port
    nobody listens on is a closed connection)."""
    request = await reader.readline()
    if request != vsock.connect_request(ECHO_PORT):
        writer.close()
        return
    writer.write(b"OK 1073741824\n")
    while (line := await reader.readline()) not in (b"END\n", b""):
        writer.write(line)
        await writer.drain()
    try:
        eof = await asyncio.wait_for(reader.read(1), NO_EOF_WINDOW_S) == b""
    except TimeoutError:
        eof = False
    writer.write(b"guest saw EOF" if eof else b"guest saw no EOF")
    writer.close()


async def exposed(tmp_path: Path, port: int) -> tuple[ExposedPort, asyncio.Server]:
    uds = tmp_path / "vsock.uds"
    guest = await asyncio.start_unix_server(hybrid_vsock, path=str(uds))
    exposed_port = ExposedPort(VirtioVsock(port, str(tmp_path / "agent.sock"), False), uds)
    exposed_port.open()
    return exposed_port, guest


def talk(path: Path, message: bytes) -> bytes:
    """A host program: connects, sends, half-closes, reads to the end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.settimeout(TIMEOUT_S)
        host.connect(str(path))
        if message:
            host.sendall(message)
            host.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := host.recv(1024):
            received += chunk
        return received


def run_bridge(tmp_path: Path, port: int, message: bytes) -> tuple[bytes, bool]:
    async def scenario() -> tuple[bytes, bool]:
        exposed_port, guest = await exposed(tmp_path, port)
        serving = asyncio.ensure_future(exposed_port.serve())
        try:
            return await asyncio.to_thread(talk, tmp_path / "agent.sock", message), True
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            exposed_port.remove()
            guest.close()

    received, _ = asyncio.run(scenario())
    return received, (tmp_path / "agent.sock").exists()


def test_a_connection_is_spliced_to_the_guest_port_both_ways(tmp_path: Path) -> None:
    received, left = run_bridge(tmp_path, ECHO_PORT, b"hello guest\n" * 100000 + b"END\n")

    assert received.startswith(b"hello guest\n" * 100000)
    # The guest's close reached the host (it read to the end); the host's half-close did
    # not reach the guest: VZ's vsock connection has no CloseWrite for tcpproxy to call.
    assert received.endswith(b"guest saw no EOF")
    assert not left  # the socket file goes with the port (Go's listener unlinks it)


def test_a_port_nobody_listens_on_is_a_closed_connection(tmp_path: Path) -> None:
    received, _ = run_bridge(tmp_path, 1027, b"")
    assert received == b""


def test_an_existing_socket_path_is_not_taken_over(tmp_path: Path) -> None:
    (tmp_path / "agent.sock").write_text("stale")
    port = ExposedPort(VirtioVsock(1, str(tmp_path / "agent.sock"), False), tmp_path / "uds")
    with pytest.raises(OSError, match="bind: Address already in use"):
        port.open()
    port.remove()  # removes only what it made
    assert (tmp_path / "agent.sock").read_text() == "stale"


def test_a_socket_path_too_long_for_macos_is_refused(tmp_path: Path) -> None:
    long_path = tmp_path / ("s" * 120)
    port = ExposedPort(VirtioVsock(1, str(long_path), False), tmp_path / "uds")
    with pytest.raises(OSError, match="invalid argument"):
        port.open()


def test_a_guest_connection_in_listen_mode_reaches_the_host_program(tmp_path: Path) -> None:
    """Guest -> host: vhost-device-vsock dials uds_PORT, the double dials socketURL."""

    async def scenario() -> bytes:
        uds = tmp_path / "vsock.uds"
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def host_program(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await reader.read(100))
            writer.close()

        host = await asyncio.start_unix_server(host_program, path=str(tmp_path / "host.sock"))
        port = ExposedPort(VirtioVsock(1026, str(tmp_path / "host.sock"), True), uds)
        port.open()
        serving = asyncio.ensure_future(port.serve())
        try:
            # What vhost-device-vsock does when the guest connects to the host's port 1026.
            _, guest = await asyncio.open_unix_connection(f"{uds}_1026")
            guest.write(b"hello host")
            await guest.drain()
            async with asyncio.timeout(TIMEOUT_S):
                return await received
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            port.remove()
            host.close()

    assert asyncio.run(scenario()) == b"hello host"
    assert not Path(f"{tmp_path / 'vsock.uds'}_1026").exists()
