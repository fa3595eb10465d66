"""The host's end of e2e network traffic: free ports to publish, HTTP and UDP clients of
a published port, a TCP server on a test network's gateway, and the check that every
address a test talks to is on this machine.

Every client here talks only to an address `assert_on_this_machine` accepts: the
host's loopback, or an address inside a network the test created (its bridge is a host
interface; its containers are the test's). No proxy is ever consulted (http.client,
not urllib, which honours $http_proxy).

A published port answers once the container's server listens, which the test cannot
observe from outside: the clients retry a refused or reset connection, and an answer
that never comes is the fact they return ("no answer: …"), for the test to compare.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tests.e2e.cni import Network

LOOPBACK = "127.0.0.1"
#: How long a published port gets to answer (a VM's server starts after `run -d`).
ANSWER_TIMEOUT_S = 60.0
#: One attempt's wait for a reply.
ATTEMPT_TIMEOUT_S = 2.0
#: Pause between attempts that were refused.
RETRY_INTERVAL_S = 0.1
#: Linux's IP_FREEBIND (not in every Python's socket module): bind to an address that is
#: not on an interface yet (a network's gateway, on its bridge from the first container).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
#: What a connection to a port nothing serves gives.
REFUSED = "refused"


def assert_on_this_machine(address: str, networks: Iterable[Network]) -> None:
    """address is the host's loopback or inside one of the test's own networks."""
    parsed = ipaddress.ip_address(address)
    assert parsed.is_loopback or any(address in network for network in networks), (
        f"{address} is neither loopback nor in a network the test made: traffic would leave"
    )


def free_port() -> int:
    """A port free for both TCP and UDP on the loopback now (the kernel's pick)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
        return port


def http_get(port: int, path: str = "/", host: str = LOOPBACK) -> str:
    """The status and body of GET path from host:port (the loopback: a published port),
    once something answers there."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        connection = http.client.HTTPConnection(host, port, timeout=ATTEMPT_TIMEOUT_S)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return f"{response.status} {response.read().decode(errors='replace')}"
        except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected,
                TimeoutError) as error:  # fmt: skip
            if time.monotonic() > deadline:
                return f"no answer: {error!r}"
        finally:
            connection.close()
        time.sleep(RETRY_INTERVAL_S)


def udp_exchange(port: int, payload: bytes) -> str:
    """What 127.0.0.1:port sends back to a datagram, once something answers there; each
    attempt from a new source port (a new conntrack entry, NATed by today's rules)."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(ATTEMPT_TIMEOUT_S)
            udp.connect((LOOPBACK, port))
            try:
                udp.send(payload)
                return udp.recv(65536).decode(errors="replace")
            except (ConnectionRefusedError, TimeoutError) as error:
                if time.monotonic() > deadline:
                    return f"no answer: {error!r}"
        time.sleep(RETRY_INTERVAL_S)


def tcp_connect(port: int) -> str:
    """One connection attempt to 127.0.0.1:port: REFUSED, or what happened instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.settimeout(ATTEMPT_TIMEOUT_S)
        try:
            tcp.connect((LOOPBACK, port))
        except ConnectionRefusedError:
            return REFUSED
        except OSError as error:
            return repr(error)
        return "connected"


def udp_send(port: int) -> str:
    """One datagram to 127.0.0.1:port: REFUSED (the host's ICMP port unreachable), or
    what happened instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(ATTEMPT_TIMEOUT_S)
        udp.connect((LOOPBACK, port))
        try:
            udp.send(b"anyone?")
            return f"answered {udp.recv(65536)!r}"
        except ConnectionRefusedError:
            return REFUSED
        except OSError as error:
            return repr(error)


def listeners(ports: Iterable[int]) -> list[str]:
    """Host sockets listening on (TCP) or bound to (UDP) one of the ports, in this
    network namespace, as "tcp:PORT"."""
    wanted = set(ports)
    found = []
    for kind, files, listening in (
        ("tcp", ("/proc/net/tcp", "/proc/net/tcp6"), "0A"),
        ("udp", ("/proc/net/udp", "/proc/net/udp6"), "07"),
    ):
        for name in files:
            with open(name) as table:
                for line in table.read().splitlines()[1:]:
                    fields = line.split()
                    port = int(fields[1].rsplit(":", 1)[1], 16)
                    if port in wanted and fields[3] == listening:
                        found.append(f"{kind}:{port}")
    return sorted(found)


@dataclass
class GatewayServer:
    """A TCP server on the host at a test network's gateway address (and no other):
    each connection's first line is recorded and answered with REPLY."""

    address: str
    port: int = 0
    received: list[str] = field(default_factory=list)

    REPLY = b"pong from the host\n"


@contextlib.contextmanager
def gateway_server(network: Network) -> Iterator[GatewayServer]:
    address = str(network.gateway)
    assert_on_this_machine(address, [network])
    with line_server(address) as server:
        yield server


@contextlib.contextmanager
def line_server(address: str) -> Iterator[GatewayServer]:
    """A GatewayServer at address (a gateway's, or the host's loopback)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    listener.bind((address, 0))
    listener.listen()
    listener.settimeout(RETRY_INTERVAL_S)
    server = GatewayServer(address, listener.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(ATTEMPT_TIMEOUT_S)
                with contextlib.suppress(OSError):
                    line = connection.makefile("rb").readline()
                    server.received.append(line.decode(errors="replace"))
                    connection.sendall(GatewayServer.REPLY)

    thread = threading.Thread(target=serve, name="gateway-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join()
        listener.close()
