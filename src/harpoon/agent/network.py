"""The VM's NIC given to a container: moved into the container's network namespace (a
netlink RTM_NEWLINK naming the init's pid, as `ip link set … netns PID` does; busybox's
`ip` cannot) and configured there with busybox's `ip`, as the host's CNI configured the
container's namespace on the host (harpoon.net.wire); the container starts once the
link is operational, as a veth CNI made is. A container whose host namespace nothing
configured never gets the NIC: it sees its loopback alone, as under runc.

Loaded lazily: most VMs never configure a network.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

from harpoon import procnet
from harpoon.agent import devices, modules
from harpoon.agent.processes import Process, ProcessTable
from harpoon.api.agent.v1 import agent_pb2
from harpoon.errdefs import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from harpoon.agent.loopback import HostLoopback

NIC_MODULE = "virtio_net"
# netfilter's filter table and the TCP match (block_tcp's rule), with x_tables, ip_tables.
FILTER_MODULES = ("iptable_filter", "xt_tcpudp")
NSENTER = "/bin/nsenter"
SHELL = "/bin/sh"
NIC_TIMEOUT_S = 10.0
#: How long the container's start waits for its NIC to be operational (RUNNING) once up.
LINK_RUNNING_TIMEOUT_S = 5.0
LINK_POLL_INTERVAL_S = 0.01
# linux/rtnetlink.h, linux/netlink.h, linux/if_link.h
RTM_NEWLINK = 16
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
IFLA_NET_NS_PID = 19
#: IPv4 prefixes this long or longer have no broadcast address (RFC 3021's /31, /32).
IPV4_POINT_TO_POINT_PREFIX = 31
_INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


def move_request(ifindex: int, pid: int, sequence: int = 1) -> bytes:
    """The RTM_NEWLINK message moving interface `ifindex` into pid's network namespace."""
    info = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0)
    attribute = struct.pack("=HHI", 8, IFLA_NET_NS_PID, pid)
    body = info + attribute
    flags = NLM_F_REQUEST | NLM_F_ACK
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWLINK, flags, sequence, 0) + body


def ack_error(reply: bytes) -> int:
    """The errno of a netlink ACK (0: success)."""
    length, kind = struct.unpack_from("=IH", reply)
    if kind != NLMSG_ERROR or length < 20:
        raise OSError(f"unexpected netlink reply of type {kind}")
    error: int = struct.unpack_from("=i", reply, 16)[0]
    return -error


def move_to_namespace_of(name: str, pid: int) -> None:
    with open(f"/sys/class/net/{name}/ifindex") as file:
        ifindex = int(file.read())
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.sendall(move_request(ifindex, pid))
        error = ack_error(sock.recv(4096))
    if error:
        raise OSError(error, f"moving {name} to the namespace of pid {pid}: {os.strerror(error)}")


def script(current: str, request: agent_pb2.ConfigureNetworkRequest) -> str:
    """The shell commands configuring the NIC (named `current` now) in the namespace;
    every value checked first, so nothing in them is shell syntax."""
    interface = request.interface
    name = interface.name or current
    if not _INTERFACE_NAME.fullmatch(name):
        raise InvalidArgument(f"network interface name {name!r} is not valid")
    mac = interface.mac.lower()
    if not _MAC.fullmatch(mac):
        raise InvalidArgument(f"network interface {name}: MAC {interface.mac!r} is not valid")
    lines = ["set -e"]
    if name != current:
        lines.append(f"ip link set dev {current} name {name}")
    settings = f" address {mac}" + (f" mtu {int(interface.mtu)}" if interface.mtu else "")
    lines.append(f"ip link set dev {name}{settings}")
    for address in interface.addresses:
        lines.append(f"ip addr add {_cidr(address)}{_broadcast(address)} dev {name}")
    lines.append(f"ip link set dev {name} up")
    if request.block_tcp:
        address, _, port = request.block_tcp.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"block_tcp {request.block_tcp!r} is not ADDRESS:PORT")
        lines.append(
            f"iptables -w -A OUTPUT -d {_address(address)} -p tcp --dport {int(port)} -j DROP"
        )
    for route in request.routes:
        destination = "default" if route.destination == "default" else _cidr(route.destination)
        family = "-6 " if ":" in route.destination or ":" in route.gateway else ""
        via = f" via {_address(route.gateway)}" if route.gateway else ""
        lines.append(f"ip {family}route add {destination}{via} dev {name}")
    lines.append(_wait_until_running(name))
    return "\n".join(lines) + "\n"


def _wait_until_running(name: str) -> str:
    """Waits until the link is operational (RUNNING, as busybox's ifconfig shows it), for
    LINK_RUNNING_TIMEOUT_S at most. The kernel marks it so from its link-watch work,
    which runs at most once a second: up to ~1 s after `up` (the move into the namespace
    ran it just before), often after the container would have started, without its IPv6
    link-local address (added then) and with its operstate down. Under runc the veth is
    up well before the container starts. A link that never gets there (no carrier) lets
    the container start as runc's would, with its link down."""
    polls = int(LINK_RUNNING_TIMEOUT_S / LINK_POLL_INTERVAL_S)
    return (
        f"i=0; while [ $i -lt {polls} ] && ! ifconfig {name} | grep -q RUNNING;"
        f" do sleep {LINK_POLL_INTERVAL_S}; i=$((i+1)); done"
    )


def _address(value: str) -> str:
    """value if it is an IPv4 or IPv6 address (socket's check: the guest's Python has no
    ipaddress module)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
            return value
        except OSError:
            continue
    raise InvalidArgument(f"{value!r} is not an IP address")


def _broadcast(address: str) -> str:
    """` broadcast +` (the prefix's last address) for an IPv4 address on a prefix with
    one, as the host's interface has it: CNI's plugins add their addresses through
    vishvananda/netlink, whose AddrAdd sets that broadcast address when none is given
    (busybox's `ip addr add`, like iproute2's, sets none unless asked). /31 and /32
    prefixes have none; nor has IPv6."""
    _, _, prefix = address.partition("/")
    if ":" in address or int(prefix) >= IPV4_POINT_TO_POINT_PREFIX:
        return ""
    return " broadcast +"


def _cidr(value: str) -> str:
    address, _, prefix = value.partition("/")
    _address(address)
    limit = 128 if ":" in address else 32
    if not prefix.isdigit() or int(prefix) > limit:
        raise InvalidArgument(f"{value!r} is not an address/prefix")
    return f"{address}/{int(prefix)}"


async def configure(table: ProcessTable, request: agent_pb2.ConfigureNetworkRequest) -> None:
    init: Process | None = None
    if request.process_id:
        init = table.get(request.process_id)
        if not init.spec.container_init or init.pid == 0:
            raise FailedPrecondition(
                f"process {request.process_id!r} is not a created container init"
            )
        if init.exit_status is not None:
            raise FailedPrecondition(f"container {request.process_id!r} has exited")
    modules.load(NIC_MODULE)
    if request.block_tcp:
        for module in FILTER_MODULES:
            modules.load(module)
    current = await devices.wait_for_device(devices.NIC, request.device_mac, NIC_TIMEOUT_S)
    commands = script(current, request)
    argv = [SHELL, "-c", commands]
    if init is not None:
        move_to_namespace_of(current, init.pid)
        argv = [NSENTER, f"--net=/proc/{init.pid}/ns/net", *argv]
    code, output = await table.run_helper_to_end(argv)
    if code != 0:
        raise FailedPrecondition(f"configuring the container's {request.interface.name}: {output}")
    if request.host_loopback:
        if init is not None:
            raise InvalidArgument("the host's loopback is NATed in the guest's own namespace only")
        global host_loopback
        from harpoon.agent import loopback

        nat = loopback.HostLoopback(table, _address(request.host_loopback))
        await nat.set_up(request.interface.name or current, ports_of(request.host_ports))
        host_loopback = nat
        _background.add(asyncio.ensure_future(nat.keep_current()))


def ports_of(ports: Iterable[agent_pb2.ListeningPort]) -> set[tuple[str, int]]:
    found = set()
    for port in ports:
        if port.protocol not in ("tcp", "udp") or not 0 < port.port < 65536:
            raise InvalidArgument(f"{port.protocol} port {port.port} is not a TCP or UDP port")
        found.add((port.protocol, port.port))
    return found


async def set_host_ports(request: agent_pb2.SetHostPortsRequest) -> None:
    if host_loopback is None:
        raise FailedPrecondition("this guest does not reach the host's loopback")
    await host_loopback.set_host_ports(ports_of(request.ports))


# The guest's NAT of the host's loopback, once configured; tasks that run as long as
# the guest, kept referenced here.
host_loopback: HostLoopback | None = None
_background: set[asyncio.Future[None]] = set()


def listening_ports(local: bool = False) -> set[tuple[str, int]]:
    """What listens in the guest's own namespace (harpoon.procnet): at a wildcard
    address (with `local`, at 127.0.0.1 or ::1 too); UDP only below the ephemeral range."""
    return procnet.listening_ports(local=local, udp_below=procnet.ephemeral_start())
