"""harpoon's default CNI network for nerdctl: nerdctl's "bridge", on a bridge and subnet
of harpoon's own, so that a user's own nerdctl (bridge `nerdctl0`, 10.4.0.0/24) and
another harpoon root on the machine keep working beside it.

How nerdctl v2.3.5 finds its default network (its source, pkg/netutil):
- `NewCNIEnv(…, WithDefaultNetwork(bridgeIP))` runs `ensureDefaultNetworkConfig` on
  every command that touches networks: `GetDefaultNetworkConfig` first looks, in the CNI
  config directory (`cni_netconfpath`), for a network labelled `nerdctl/default-network`
  (`nerdctlLabels` in the conflist, labels.NerdctlDefaultNetwork), then for one named
  "bridge" (DefaultNetworkName); only if neither exists does it write its own,
  `<netconfpath>/nerdctl-bridge.conflist` (getConfigPathForNetworkName: the default
  network is never namespaced).
- The one it writes has the subnet of `bridge_ip` (nerdctl.toml) or `--bridge-ip`, else
  DefaultCIDR 10.4.0.0/24, and a bridge always named `nerdctl0` (netutil_unix.go,
  `newBridgePlugin("nerdctl0")` when name == DefaultNetworkName): no setting changes
  the bridge's name.
So harpoon writes that file itself, in nerdctl's own format (cniNetworkConfig: name
"bridge", `nerdctlID` sha256 of the name, the label, and the plugins nerdctl puts in a
bridge network: bridge, portmap, firewall, tuning), with its own bridge and subnet and
host-local's `dataDir` under harpoon's state (its default, /var/lib/cni/networks/<name>,
would be shared with the user's nerdctl's "bridge"). `bridge_ip` in nerdctl.toml names
the same subnet, for the hooks and for a nerdctl that rewrites it.

The bridge and subnet: `harpoon0` on 10.213.0.0/24 for the machine's harpoon; under a
HARPOON_ROOT, `hp-<hash of the root>` on a /24 of 10.213.0.0/16 chosen from the same
hash. Chosen once, when the conflist is first written: later starts keep what is there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

#: nerdctl's name for its default network, and its label marking a network as that.
NETWORK_NAME = "bridge"
DEFAULT_NETWORK_LABEL = "nerdctl/default-network"
#: nerdctl writes CNI 1.0.0 conflists.
CNI_VERSION = "1.0.0"
#: The machine's harpoon network, and the pool the networks of other roots come from.
MACHINE_BRIDGE = "harpoon0"
SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
#: Linux's limit on an interface name (IFNAMSIZ less the NUL).
IFNAME_MAX_CHARS = 15
#: The CNI plugins a bridge network of nerdctl runs, in order.
PLUGINS = ("bridge", "portmap", "firewall", "tuning")


@dataclass(frozen=True)
class DefaultNetwork:
    bridge: str
    subnet: ipaddress.IPv4Network

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def bridge_ip(self) -> str:
        """nerdctl's `bridge_ip`: the gateway with the subnet's prefix length."""
        return f"{self.gateway}/{self.subnet.prefixlen}"


def conflist_path(netconf_dir: Path) -> Path:
    """Where nerdctl looks for (and would write) its default network's configuration."""
    return netconf_dir / f"nerdctl-{NETWORK_NAME}.conflist"


def choose(root: str | None, in_use: list[ipaddress.IPv4Network]) -> DefaultNetwork:
    """The network for harpoon's root (None: the machine's harpoon): the /24 of
    SUBNET_POOL its hash points at, or the next one no host address or route in `in_use`
    overlaps."""
    if root is None:
        bridge, start = MACHINE_BRIDGE, 0
    else:
        digest = hashlib.sha256(root.encode()).hexdigest()
        bridge = f"hp-{digest[:8]}"
        start = 1 + int(digest[8:12], 16) % 254
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))
    for offset in range(len(candidates)):
        subnet = candidates[(start + offset) % len(candidates)]
        if not any(subnet.overlaps(used) for used in in_use if used.prefixlen > 0):
            return DefaultNetwork(bridge, subnet)
    raise RuntimeError(f"every /24 of {SUBNET_POOL} overlaps a host address or route")


def render_conflist(network: DefaultNetwork, ipam_dir: Path) -> str:
    """The conflist of nerdctl's default network on harpoon's bridge and subnet (the
    fields and order nerdctl's own have)."""
    config = {
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "nerdctlID": hashlib.sha256(NETWORK_NAME.encode()).hexdigest(),
        "nerdctlLabels": {DEFAULT_NETWORK_LABEL: "true"},
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"gateway": str(network.gateway), "subnet": str(network.subnet)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "firewall", "ingressPolicy": "same-bridge"},
            {"type": "tuning"},
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def read(netconf_dir: Path) -> DefaultNetwork | None:
    """The bridge and subnet of the default network harpoon wrote, if it is there."""
    try:
        config = json.loads(conflist_path(netconf_dir).read_text())
        (bridge,) = [p for p in config["plugins"] if p["type"] == "bridge"]
        subnet = ipaddress.IPv4Network(bridge["ipam"]["ranges"][0][0]["subnet"])
        return DefaultNetwork(str(bridge["bridge"]), subnet)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
