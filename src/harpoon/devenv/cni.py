"""nerdctl networks made for a test or a benchmark (CNI bridges on subnets they choose),
and their removal with all CNI leaves of them on the host.

A network is created with `nerdctl network create --subnet` on a /24 under
10.231.0.0/16 that no host address or route touches (checked, not assumed: other tests
and sessions use some of them), in the CNI config directory of a nerdctl of
harpoon.devenv.nerdctl. Its name must be unique on the machine, not only in a session:
nerdctl names the bridge after it (br-<sha256 of the name>), and host-local IPAM keeps
its allocations under /var/lib/cni/networks/<name>. The bridge appears at the first
container on it.

Removing a network removes what nerdctl's `network rm` leaves: the bridge, if any; the
rules CNI's firewall plugin made for it, which it keeps for the bridge's life and no
plugin removes (`CNI-ISOLATION-STAGE-*`, naming the bridge); host-local's directory
(its lock and last reserved address; an address still reserved there is a leak). The
chains CNI's plugins share (CNI-HOSTPORT-*, CNI-FORWARD, CNI-ISOLATION-STAGE-*) stay,
as they do for every CNI user.
"""

from __future__ import annotations

import ipaddress
import json
import random
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.nerdctl import OfflineNerdctl

#: Where the networks' subnets are taken from: /24s of it.
SUBNET_POOL = ipaddress.IPv4Network("10.231.0.0/16")
#: The first /24 of the pool tried (lower ones are test_harpoon_network's and probes').
FIRST_SUBNET_INDEX = 20
#: Where CNI's host-local IPAM keeps each network's allocations (its default dataDir).
HOST_LOCAL_DIR = Path("/var/lib/cni/networks")
#: What host-local keeps in a network's directory besides reservations.
HOST_LOCAL_BOOKKEEPING = ("lock", "last_reserved_ip.")


@dataclass(frozen=True)
class Network:
    """A nerdctl network a test or a benchmark created."""

    name: str
    subnet: ipaddress.IPv4Network
    bridge: str
    """Its Linux bridge (CNI's bridge plugin makes it at the first container)."""

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's address, the containers' default route (nerdctl's choice)."""
        return self.subnet.network_address + 1

    def __contains__(self, address: object) -> bool:
        return ipaddress.ip_address(str(address)) in self.subnet


def ip_json(*args: str) -> list[dict[str, object]]:
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    result: list[dict[str, object]] = json.loads(done.stdout or "[]")
    return result


def subnets_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix of the host's addresses and routes."""
    found = []
    for link in ip_json("-4", "address", "show"):
        for info in link.get("addr_info", []):  # type: ignore[attr-defined]
            found.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in ip_json("-4", "route", "show", "table", "all"):
        destination = str(route.get("dst", ""))
        if destination and destination != "default":
            found.append(ipaddress.ip_network(destination, strict=False))
    return [network for network in found if isinstance(network, ipaddress.IPv4Network)]


def free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """`count` /24s of SUBNET_POOL that no host address or route overlaps."""
    used = [network for network in subnets_in_use() if network.prefixlen > 0]
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))[FIRST_SUBNET_INDEX:]
    free = [subnet for subnet in candidates if not any(subnet.overlaps(u) for u in used)]
    if len(free) < count:
        raise RuntimeError(f"fewer than {count} free /24s in {SUBNET_POOL}")
    return free[:count]


def a_free_subnet() -> ipaddress.IPv4Network:
    """One free /24 (free_subnets), picked at random among the first 16: a network
    another session makes meanwhile (its bridge appears at its first container) then
    seldom has the same one."""
    return random.choice(free_subnets(16))


def create(nerdctl: OfflineNerdctl, name: str, subnet: ipaddress.IPv4Network) -> Network:
    nerdctl.check("network", "create", "--subnet", str(subnet), name)
    conflist = nerdctl.cni_config_dir / "default" / f"nerdctl-{name}.conflist"
    config = json.loads(conflist.read_text())
    (bridge,) = [plugin["bridge"] for plugin in config["plugins"] if plugin["type"] == "bridge"]
    return Network(name, subnet, bridge)


def remove(nerdctl: OfflineNerdctl, network: Network) -> list[str]:
    """Removes the network, its bridge and its isolation rules; what was left after
    nerdctl's own removal besides those rules (nothing, or it is a leak to report)."""
    nerdctl.check("network", "rm", network.name)
    return forget(network.name, network.bridge)


def forget(name: str, bridge: str) -> list[str]:
    """What `nerdctl network rm NAME` (or compose's `down`) leaves of a network, removed:
    its bridge, the firewall plugin's isolation rules, host-local's directory. Returns
    what of it was a leak (a bridge, rules other than isolation ones, reservations)."""
    left = remove_bridge(bridge)
    allocations = HOST_LOCAL_DIR / name
    if allocations.exists():
        left += [
            f"host-local reservation {entry}"
            for entry in allocations.iterdir()
            if not entry.name.startswith(HOST_LOCAL_BOOKKEEPING)
        ]
        shutil.rmtree(allocations)
    return left


def bridge_named(config_dir: Path, name: str) -> str | None:
    """The bridge of nerdctl's network `name`, from its conflist under config_dir (a
    namespace's networks are in a directory of its name); None without one."""
    for conflist in config_dir.rglob(f"nerdctl-{name}.conflist"):
        config = json.loads(conflist.read_text())
        for plugin in config.get("plugins", []):
            if plugin.get("type") == "bridge" and isinstance(plugin.get("bridge"), str):
                return str(plugin["bridge"])
    return None


def remove_bridge(bridge: str) -> list[str]:
    """Removes a CNI bridge and the rules CNI's plugins made for it; what there was
    besides the firewall plugin's isolation rules (which outlive every container)."""
    left = []
    if Path(f"/sys/class/net/{bridge}").exists():
        left.append(f"bridge {bridge}")
        subprocess.run(["ip", "link", "delete", bridge], check=False)
    for table, rule in iptables_rules(bridge):
        if "CNI firewall plugin rules (ingressPolicy: same-bridge)" not in rule:
            left.append(f"iptables -t {table} {rule}")
        # "-A CHAIN …" as iptables-save prints it is the rule iptables -D deletes.
        argv = shlex.split(rule)
        subprocess.run(["iptables", "-t", table, "-D", *argv[1:]], check=True)
    return left


def iptables_rules(*needles: str) -> list[tuple[str, str]]:
    """(table, rule) of every iptables rule mentioning one of the needles, as
    iptables-save prints it ("-A CHAIN …")."""
    done = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True)
    found, table = [], ""
    for line in done.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and any(needle in line for needle in needles):
            found.append((table, line))
    return found
