"""The agent's side of a container's network (harpoon.agent.network): the netlink
message that moves the NIC, the shell commands that configure it, and the listening
ports it reports, checked against what the kernel's formats say. The commands give the
interface the shape CNI gave the veth on the host, down to the broadcast address CNI's
plugins give an IPv4 address, and return once the link is operational (RUNNING): run
with busybox's `ip` and `ifconfig` (the guest's) in a scratch network namespace when
root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harpoon import procnet
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
        "ip addr add 10.231.8.6/24 broadcast + dev eth0",
        "ip addr add fd00::6/64 dev eth0",
        "ip link set dev eth0 up",
        "ip route add default via 10.231.8.1 dev eth0",
        "ip route add 10.99.0.0/16 via 10.231.8.254 dev eth0",
        "ip -6 route add fd01::/64 via fd00::1 dev eth0",
        "i=0; while [ $i -lt 500 ] && ! ifconfig eth0 | grep -q RUNNING;"
        " do sleep 0.01; i=$((i+1)); done",
    ]


def test_point_to_point_and_ipv6_addresses_get_no_broadcast_address() -> None:
    script = network.script("eth1", request(addresses=["10.0.0.1/31", "10.0.0.9/32"]))
    assert "ip addr add 10.0.0.1/31 dev eth0\n" in script
    assert "ip addr add 10.0.0.9/32 dev eth0\n" in script
    assert "broadcast" not in script


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
    assert procnet.listening_ports(tables, udp_below=32768) == {("tcp", 8080), ("udp", 5353)}
    # The host's side of its loopback: every unconnected UDP socket, 127.0.0.1's too.
    assert procnet.listening_ports(tables, local=True) == {
        ("tcp", 8080),
        ("tcp", 8081),
        ("udp", 5353),
        ("udp", 40000),
    }


BUSYBOX = Path("/bin/busybox")


@pytest.fixture
def scratch_namespace() -> Iterator[str]:
    """A network namespace of this test's with a veth end named v0 in it (its peer v1
    too: nothing of it is on the host's network)."""
    if os.geteuid() != 0 or shutil.which("ip") is None or not BUSYBOX.exists():
        pytest.skip("needs root, iproute2 and busybox-static")
    name = f"hp-unit-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name",
                        "v1"], check=True)  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def run_script(namespace: str, script: str, tmp_path: Path) -> dict[str, Any]:
    """Runs the script with busybox's applets in the namespace; eth0 as `ip -j` shows it."""
    iproute2 = shutil.which("ip")
    assert iproute2 is not None
    for applet in ("ip", "ifconfig"):  # the guest's are busybox's
        (tmp_path / applet).symlink_to(BUSYBOX)
    done = subprocess.run(
        [iproute2, "netns", "exec", namespace, str(BUSYBOX), "sh", "-c", script],
        env=dict(os.environ, PATH=f"{tmp_path}:/usr/sbin:/usr/bin:/sbin:/bin"),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(
        [iproute2, "-n", namespace, "-j", "address", "show", "dev", "eth0"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    (link,) = json.loads(shown)
    result: dict[str, Any] = link
    return result


def test_busybox_ip_gives_the_interface_the_hosts_shape(
    scratch_namespace: str, tmp_path: Path
) -> None:
    # Its peer up: v0 gets a carrier once the script sets it up, as a NIC does.
    subprocess.run(["ip", "-n", scratch_namespace, "link", "set", "v1", "up"], check=True)
    script = network.script("v0", request(addresses=["10.231.8.6/24", "fd00::6/64", "10.0.0.9/32"]))
    link = run_script(scratch_namespace, script, tmp_path)
    addresses = {
        f"{info['local']}/{info['prefixlen']}": info.get("broadcast")
        for info in link["addr_info"]
        if info["family"] == "inet"
    }
    assert addresses == {"10.231.8.6/24": "10.231.8.255", "10.0.0.9/32": None}
    assert link["address"] == "7e:56:ff:b5:38:d0"
    assert link["operstate"] == "UP"


def test_a_link_that_never_runs_lets_the_container_start_with_it_down(
    scratch_namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "LINK_RUNNING_TIMEOUT_S", 0.2)
    # v1 stays down: v0 never gets a carrier.
    link = run_script(scratch_namespace, network.script("v0", request()), tmp_path)
    assert "NO-CARRIER" in link["flags"] and link["operstate"] == "LOWERLAYERDOWN"
