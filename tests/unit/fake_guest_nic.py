"""A guest's NIC without a guest: Ethernet frames over gvproxy's QEMU socket, built and
read by hand, so that tests see what a VM would see from its gvproxy (DNS answers,
the host's loopback at the NAT address, a published port's connections) with no VM.

It speaks QEMU's `-netdev stream` framing (each frame after its length, 4 bytes big
endian), or, for a gvproxy listening for vfkit (`nic_protocol="vfkit"`), vfkit's: a
unixgram socket of its own bound next to gvproxy's, the 4-byte magic "VFKT" first, then
a frame per datagram (vfkit pkg/vf/virtionet.go). It answers ARP for its own address
(gvproxy asks before it sends to the guest) and sends UDP; of TCP it only reads the SYN
a connection to a published port sends. IPv4 only, as gvproxy's stack is. gvproxy exits
when a QEMU NIC hangs up, as when QEMU does.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from harpoon.net.gvproxy import GvproxyConfig

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
IP_PROTOCOL_TCP = 6
IP_PROTOCOL_UDP = 17
DNS_TYPE_A = 1
DNS_PORT = 53
ETHERNET_HEADER_BYTES = 14
IPV4_HEADER_BYTES = 20  # no options: gvproxy sends none
UDP_HEADER_BYTES = 8
READ_TIMEOUT_S = 5.0
VFKIT_MAGIC = b"VFKT"
DATAGRAM_BYTES = 65536


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class Ipv4Packet:
    source: IPv4Address
    destination: IPv4Address
    protocol: int
    payload: bytes

    @property
    def ports(self) -> tuple[int, int]:
        """(source, destination) port of a TCP or UDP payload."""
        source, destination = struct.unpack(">HH", self.payload[:4])
        return source, destination

    @property
    def udp_data(self) -> bytes:
        return self.payload[UDP_HEADER_BYTES:]


def dns_query(name: str, query_id: int = 0x4861) -> bytes:
    """A recursive query for name's A record."""
    header = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.rstrip(".").split("."))
    return header + labels + b"\0" + struct.pack(">HH", DNS_TYPE_A, 1)


def dns_answer(response: bytes) -> tuple[int, list[IPv4Address]]:
    """(rcode, A records) of a response to dns_query (its one question, compressed names)."""
    rcode = response[3] & 0x0F
    answers = struct.unpack(">H", response[6:8])[0]
    offset = _skip_name(response, 12) + 4  # the question: its name, type and class
    found = []
    for _ in range(answers):
        offset = _skip_name(response, offset)
        kind, _class, _ttl, length = struct.unpack(">HHIH", response[offset : offset + 10])
        offset += 10
        if kind == DNS_TYPE_A:
            found.append(IPv4Address(response[offset : offset + length]))
        offset += length
    return rcode, found


def _skip_name(message: bytes, offset: int) -> int:
    """The offset past the name at offset: labels up to the root, or up to a pointer."""
    while message[offset]:
        if message[offset] & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + message[offset]
    return offset + 1


class FakeGuestNic:
    """The guest's NIC, connected to a gvproxy's socket; use as a context manager."""

    def __init__(self, config: GvproxyConfig) -> None:
        self.address = config.guest
        self.mac = _mac(config.guest_mac)
        self.gateway = config.gateway
        self.gateway_mac = _mac(config.gateway_mac)
        self._datagrams = config.nic_protocol == "vfkit"
        self._bound: Path | None = None
        if self._datagrams:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._bound = config.state_dir / "fake-nic.sock"
            self._socket.bind(str(self._bound))
        else:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(READ_TIMEOUT_S)
        self._socket.connect(str(config.net_socket))
        if self._datagrams:
            self._socket.send(VFKIT_MAGIC)
        self._pending = b""

    def __enter__(self) -> FakeGuestNic:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._socket.close()
        if self._bound is not None:
            self._bound.unlink(missing_ok=True)

    def send_udp(self, destination: IPv4Address, port: int, data: bytes, source_port: int) -> None:
        # UDP's checksum is optional over IPv4: 0 says there is none.
        udp = struct.pack(">HHHH", source_port, port, UDP_HEADER_BYTES + len(data), 0) + data
        self._send_ipv4(destination, IP_PROTOCOL_UDP, udp)

    def receive(self, protocol: int) -> Ipv4Packet:
        """The next IPv4 packet of protocol sent to the guest (ARP answered meanwhile)."""
        while True:
            frame = self._read_frame()
            ethertype = struct.unpack(">H", frame[12:14])[0]
            if ethertype == ETHERTYPE_ARP:
                self._answer_arp(frame[ETHERNET_HEADER_BYTES:])
            elif ethertype == ETHERTYPE_IPV4:
                packet = frame[ETHERNET_HEADER_BYTES:]
                if packet[9] == protocol:
                    return Ipv4Packet(
                        source=IPv4Address(packet[12:16]),
                        destination=IPv4Address(packet[16:20]),
                        protocol=packet[9],
                        payload=packet[IPV4_HEADER_BYTES : struct.unpack(">H", packet[2:4])[0]],
                    )

    def resolve(self, name: str) -> tuple[int, list[IPv4Address]]:
        """Asks the gateway's DNS for name's A record: (rcode, addresses)."""
        self.send_udp(self.gateway, DNS_PORT, dns_query(name), source_port=40053)
        return dns_answer(self.receive(IP_PROTOCOL_UDP).udp_data)

    def _send_ipv4(self, destination: IPv4Address, protocol: int, payload: bytes) -> None:
        header = struct.pack(
            ">BBHHHBBH4s4s",
            0x45, 0, IPV4_HEADER_BYTES + len(payload), 1, 0, 64, protocol, 0,
            self.address.packed, destination.packed,
        )  # fmt: skip
        header = header[:10] + struct.pack(">H", _checksum(header)) + header[12:]
        self._send_frame(self.gateway_mac, ETHERTYPE_IPV4, header + payload)

    def _answer_arp(self, arp: bytes) -> None:
        operation, target = struct.unpack(">H", arp[6:8])[0], arp[24:28]
        if operation != 1 or target != self.address.packed:
            return
        sender_mac, sender_ip = arp[8:14], arp[14:18]
        reply = struct.pack(">HHBBH", 1, ETHERTYPE_IPV4, 6, 4, 2)
        reply += self.mac + self.address.packed + sender_mac + sender_ip
        self._send_frame(sender_mac, ETHERTYPE_ARP, reply)

    def _send_frame(self, destination_mac: bytes, ethertype: int, payload: bytes) -> None:
        frame = destination_mac + self.mac + struct.pack(">H", ethertype) + payload
        if self._datagrams:
            self._socket.send(frame)
        else:
            self._socket.sendall(struct.pack(">I", len(frame)) + frame)

    def _read_frame(self) -> bytes:
        if self._datagrams:
            return self._socket.recv(DATAGRAM_BYTES)
        length = struct.unpack(">I", self._read_exactly(4))[0]
        return self._read_exactly(length)

    def _read_exactly(self, size: int) -> bytes:
        while len(self._pending) < size:
            chunk = self._socket.recv(65536)
            if not chunk:
                raise ConnectionError("gvproxy closed the NIC's socket")
            self._pending += chunk
        data, self._pending = self._pending[:size], self._pending[size:]
        return data
