"""A VM's NIC wired to what CNI made in its network namespace, as Kata's "tcfilter" mode.

Before the VM starts, `prepare` creates the tap its NIC opens (QEMU runs in the
namespace; `microvm` cannot hot-plug a NIC, and a VM template carries the NIC). After
CNI's hooks ran, `scan` reads what they configured (the veth, its addresses, MAC and
MTU, the routes) and `redirect` joins the veth and the tap with tc: every frame that
enters one leaves by the other (an ingress qdisc, a u32 filter matching everything, a
mirred redirect). The namespace's own IP stack never sees a frame; the guest answers
for the veth's address with the veth's MAC, so CNI's bridge, portmap and firewall
rules, which name that address, work unchanged. The veth keeps its addresses, so what
reads the namespace (`nerdctl inspect`) sees the container's.

`scan` is pure over `ip -j` output (parse_links, parse_addresses, parse_routes);
everything else runs `ip`/`tc` in the namespace (harpoon.net.netns).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harpoon.net import netns

#: The tap a VM's NIC opens, in the VM's own namespace (so one name serves every VM).
TAP_NAME = "tap0"


@dataclass(frozen=True)
class Interface:
    """An interface CNI configured, as the guest must show it."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[str, ...]
    """Each as address/prefix (CIDR), IPv4 and IPv6 (no link-local ones)."""


@dataclass(frozen=True)
class Route:
    destination: str
    """A prefix, or "default"."""
    gateway: str
    """Empty for a route to a directly connected prefix."""
    device: str


@dataclass(frozen=True)
class Network:
    """What the guest must configure: one interface (today's limit) and its routes."""

    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...]


def scan(namespace: Path) -> Network:
    """What CNI configured in the namespace: every interface but lo and the tap."""

    # One process for the three tables (each `ip -j` prints one line of JSON).
    script = "ip -j address show; echo; ip -j -4 route show; echo; ip -j -6 route show; echo"
    output = netns.run_in(namespace, ["sh", "-c", script], f"reading {namespace}")
    tables = [json.loads(line or "[]") for line in output.split("\n")[:3]]
    tables += [[]] * (3 - len(tables))
    interfaces = parse_addresses(tables[0])
    names = {interface.name for interface in interfaces}
    routes = [
        route for table in tables[1:] for route in parse_routes(table) if route.device in names
    ]
    return Network(tuple(interfaces), tuple(routes))


def parse_addresses(document: list[dict[str, Any]]) -> list[Interface]:
    """`ip -j address show` → the interfaces CNI made (not lo, the tap, or one down)."""
    found = []
    for link in document:
        name = link.get("ifname", "")
        if name in ("lo", TAP_NAME) or "UP" not in link.get("flags", []):
            continue
        addresses = tuple(
            f"{info['local']}/{info['prefixlen']}"
            for info in link.get("addr_info", [])
            if info.get("family") in ("inet", "inet6") and info.get("scope") != "link"
        )
        found.append(
            Interface(name, link.get("address", ""), int(link.get("mtu", 1500)), addresses)
        )
    return found


def parse_routes(document: list[dict[str, Any]]) -> list[Route]:
    """`ip -j route show` → the routes the guest must add: not the prefix routes its
    addresses imply (`proto kernel`), not IPv6 link-local ones."""
    routes = []
    for entry in document:
        if entry.get("protocol") == "kernel" or entry.get("type", "unicast") != "unicast":
            continue
        destination = entry.get("dst", "")
        if destination != "default":
            network = ipaddress.ip_network(destination, strict=False)
            if network.is_link_local or network.is_multicast:
                continue
        routes.append(Route(destination, entry.get("gateway", ""), entry.get("dev", "")))
    return routes


def after_cni(namespace: Path, vmm_pid: int) -> None:
    """Moves the tap after what CNI made in the namespace's interface order: out to
    this process's namespace and back into the VMM's (its QEMU keeps it open through
    both moves). Tools that read the namespace take its first interface that is up for
    the container's (nerdctl inspect's IPAddress); made before the VM, the tap had the
    lower index. Moved back, it keeps the index it got outside, above CNI's."""
    what = f"moving {TAP_NAME} after the interfaces of {namespace}"
    outside = f"hp{os.getpid() % 100000}t{vmm_pid % 100000}"[:15]
    move_out = ["ip", "link", "set", "dev", TAP_NAME, "netns", str(os.getpid()), "name", outside]
    netns.run_in(namespace, move_out, what)
    move_in = ["ip", "link", "set", "dev", outside, "netns", str(vmm_pid), "name", TAP_NAME]
    try:
        netns.run(move_in, what)
    except BaseException:
        subprocess.run(["ip", "link", "delete", outside], capture_output=True, check=False)
        raise
    netns.run_in(namespace, ["ip", "link", "set", "dev", TAP_NAME, "up"], what)


def redirect(namespace: Path, interface: Interface) -> None:
    """Every frame into the interface leaves by the tap, and every frame from the tap
    (the guest's) leaves by the interface."""
    what = f"joining {interface.name} and {TAP_NAME} in {namespace}"
    netns.run_in(namespace, ["ip", "link", "set", "dev", TAP_NAME, "mtu", str(interface.mtu)], what)
    for source, target in ((interface.name, TAP_NAME), (TAP_NAME, interface.name)):
        netns.run_in(namespace, ["tc", "qdisc", "add", "dev", source, "ingress"], what)
        netns.run_in(
            namespace,
            [
                "tc", "filter", "add", "dev", source, "parent", "ffff:", "protocol", "all",
                "u32", "match", "u8", "0", "0",
                "action", "mirred", "egress", "redirect", "dev", target,
            ],
            what,
        )  # fmt: skip


def prepare(namespace: Path, owned: bool) -> None:
    """The namespace (created if it is harpoon's) with the VM's tap in it, up, before
    its VMM launches; idempotent (the VM launched ahead prepared it already)."""
    netns.prepare_with_tap(namespace, owned, TAP_NAME)


def release(namespace: Path, owned: bool) -> None:
    """Undoes prepare and redirect once the VMM is gone: a namespace of harpoon's goes
    (the tap with it); in another's (a CRI pod's), the tap and the redirects go, and
    the interfaces CNI made stay for whoever made them."""
    if owned:
        netns.remove(namespace)
        return
    if not namespace.exists():
        return
    what = f"releasing {TAP_NAME} in {namespace}"
    links = json.loads(netns.run_in(namespace, ["ip", "-j", "link", "show"], what) or "[]")
    for link in links:
        name = link.get("ifname", "")
        if name == TAP_NAME:
            netns.run_in(namespace, ["ip", "link", "delete", "dev", TAP_NAME], what)
        elif name != "lo":
            # No ingress qdisc (never redirected): tc says so, and nothing is wrong.
            with contextlib.suppress(netns.NetnsError):
                netns.run_in(namespace, ["tc", "qdisc", "del", "dev", name, "ingress"], what)
