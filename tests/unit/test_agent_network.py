"""The agent's side of a container's network (harpoon.agent.network): the netlink
message that moves the NIC, the shell commands that configure it, and the listening
ports it reports, checked against what the kernel's formats say."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from harpoon.agent import network
from harpoon.api.agent.v1 import agent_pb2
from harpoon.errdefs import InvalidArgument


def request(**interface: object) -> agent_pb2.ConfigureNetworkRequest:
    fields = {"name": "eth0", "mac": "7E:56:FF:B5:38:D0", "mtu": 1450,
              "addresses": ["10.231.8.6/24", "fd00::6/64"], **interface}  # fmt: skip
    return agent_pb2.ConfigureNetworkRequest(
        process_id="init",
        interface=agent_pb2.NetworkInterface(**fields),  # type: ignore[arg-type]
        routes=[
            agent_pb2.NetworkRoute(destination="default", gateway="10.231.8.1"),
            agent_pb2.NetworkRoute(destination="10.99.0.0/16", gateway="10.231.8.254"),
            agent_pb2.NetworkRoute(destination="fd01::/64", gateway="fd00::1"),
        ],
    )


def test_the_script_sets_the_mac_mtu_addresses_and_routes_in_order() -> None:
    assert network.script("eth1", request()).splitlines() == [
        "set -e",
        "ip link set dev eth1 name eth0",
        "ip link set dev eth0 address 7e:56:ff:b5:38:d0 mtu 1450",
        "ip addr add 10.231.8.6/24 dev eth0",
        "ip addr add fd00::6/64 dev eth0",
        "ip link set dev eth0 up",
        "ip route add default via 10.231.8.1 dev eth0",
        "ip route add 10.99.0.0/16 via 10.231.8.254 dev eth0",
        "ip -6 route add fd01::/64 via fd00::1 dev eth0",
    ]


@pytest.mark.parametrize(
    "interface",
    [
        {"name": "eth0; reboot"},
        {"mac": "7e:56:ff:b5:38"},
        {"addresses": ["10.231.8.6"]},
        {"addresses": ["10.231.8.6/33"]},
        {"addresses": ["$(reboot)/24"]},
    ],
)
def test_nothing_unchecked_reaches_the_shell(interface: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        network.script("eth0", request(**interface))


def test_the_move_is_an_rtm_newlink_naming_the_pid_and_asking_for_an_ack() -> None:
    message = network.move_request(ifindex=3, pid=4242, sequence=7)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", message)
    assert (length, kind, sequence) == (len(message), network.RTM_NEWLINK, 7)
    assert flags == network.NLM_F_REQUEST | network.NLM_F_ACK
    family, _, index = struct.unpack_from("=BxHi", message, 16)
    assert (family, index) == (socket.AF_UNSPEC, 3)
    assert struct.unpack_from("=HHI", message, 32) == (8, network.IFLA_NET_NS_PID, 4242)


def test_an_ack_says_the_errno() -> None:
    ack = struct.pack("=IHHII", 36, network.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1)
    assert network.ack_error(ack + bytes(16)) == 1
    assert network.ack_error(struct.pack("=IHHIIi", 36, 2, 0, 1, 0, 0) + bytes(16)) == 0


def test_listening_ports_are_wildcard_listeners_and_unconnected_udp_services(
    tmp_path: Path,
) -> None:
    header = "  sl  local_address rem_address   st ...\n"
    tcp = tmp_path / "tcp"
    tcp.write_text(header + "".join([
        "0: 00000000:1F90 00000000:0000 0A\n",  # 0.0.0.0:8080 LISTEN
        "1: 0100007F:1F91 00000000:0000 0A\n",  # 127.0.0.1:8081 LISTEN: the guest's own
        "2: 00000000:1F92 0200A8C0:D431 01\n",  # established
    ]))  # fmt: skip
    udp = tmp_path / "udp6"
    udp.write_text(header + "".join([
        "0: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07\n",
        "1: 00000000000000000000000000000000:9C40 00000000000000000000000000000000:0000 07\n",
    ]))  # fmt: skip
    tables = ((str(tcp), "tcp"), (str(udp), "udp"), (str(tmp_path / "gone"), "tcp"))
    # 5353/udp is a service; 40000/udp is a client's ephemeral port.
    assert network.listening_ports(tables) == {("tcp", 8080), ("udp", 5353)}
