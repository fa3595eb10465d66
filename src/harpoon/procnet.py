"""The TCP and UDP ports something listens on in this network namespace, read from
/proc/net/{tcp,udp}{,6} (the kernel's socket tables; each address as hex, each 32-bit
word in host byte order). Pure but for the reads; used in the guest (its listeners are
published on the host) and on the host (its loopback's listeners are what a container
sharing the host's network reaches at 127.0.0.1)."""

from __future__ import annotations

#: /proc/net tables, and their protocol.
SOCKET_TABLES = (
    ("/proc/net/tcp", "tcp"),
    ("/proc/net/tcp6", "tcp"),
    ("/proc/net/udp", "udp"),
    ("/proc/net/udp6", "udp"),
)
TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"
WILDCARDS = ("00000000", "00000000000000000000000000000000")
#: 127.0.0.1 and ::1.
LOOPBACKS = ("0100007F", "00000000000000000000000001000000")

Port = tuple[str, int]


def listening_ports(
    tables: tuple[tuple[str, str], ...] = SOCKET_TABLES,
    local: bool = False,
    udp_below: int | None = None,
) -> set[Port]:
    """(protocol, port) of each TCP listener and unconnected UDP socket bound to a
    wildcard address (with `local`, to 127.0.0.1 or ::1 too); UDP's only below
    `udp_below` if given (a client's own sockets, in the ephemeral range, are not
    services)."""
    addresses = (*WILDCARDS, *LOOPBACKS) if local else WILDCARDS
    found: set[Port] = set()
    for path, protocol in tables:
        try:
            with open(path) as table:
                next(table, None)  # the header
                rows = [line.split() for line in table]
        except OSError:
            continue
        for row in rows:
            if len(row) < 4:
                continue
            address, _, port_hex = row[1].partition(":")
            if address not in addresses:
                continue
            port, state = int(port_hex, 16), row[3]
            if (protocol == "tcp" and state == TCP_LISTEN) or (
                protocol == "udp"
                and state == UDP_UNCONNECTED
                and 0 < port < (udp_below if udp_below is not None else 65536)
            ):
                found.add((protocol, port))
    return found


def ephemeral_start(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """Where this namespace's ephemeral ports begin."""
    try:
        with open(path) as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
