"""The nerdctl networks e2e tests make (harpoon.devenv.cni) and what CNI leaves on the
host that a test checks: the bridge's ports, its ingress qdisc, iptables rules.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

from harpoon.devenv.cni import (
    Network,
    create,
    free_subnets,
    ip_json,
    iptables_rules,
    remove,
)

__all__ = [
    "Network",
    "addresses_of",
    "bridge_has_ingress_qdisc",
    "bridge_ports",
    "create",
    "free_subnets",
    "iptables_rules",
    "port_rules",
    "remove",
]


def port_rules(ports: Iterable[int]) -> list[str]:
    """The iptables rules naming one of these ports (portmap's DNAT and its marks)."""
    return [rule for _, rule in iptables_rules(*(f"--dport {port} " for port in ports))]


def bridge_ports(network: Network) -> list[str]:
    """The interfaces enslaved to the network's bridge (the containers' veths)."""
    if not Path(f"/sys/class/net/{network.bridge}").exists():
        return []
    return [str(link["ifname"]) for link in ip_json("link", "show", "master", network.bridge)]


def bridge_has_ingress_qdisc(network: Network) -> bool:
    if not Path(f"/sys/class/net/{network.bridge}").exists():
        return False
    done = subprocess.run(
        ["tc", "-j", "qdisc", "show", "dev", network.bridge],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return any(qdisc.get("kind") == "ingress" for qdisc in json.loads(done.stdout or "[]"))


def addresses_of(interface: str) -> list[str]:
    """The IPv4 addresses on a host interface ([] if there is none of that name)."""
    if not Path(f"/sys/class/net/{interface}").exists():
        return []
    return [
        str(info["local"])
        for link in ip_json("-4", "address", "show", "dev", interface)
        for info in link.get("addr_info", [])  # type: ignore[attr-defined]
    ]
