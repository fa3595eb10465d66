"""The host's loopback seen from a guest that shares the host's network (gvproxy's
user-mode network): a connection to 127.0.0.1 on a port the host listens on (at its
127.0.0.1 or a wildcard address) and the guest does not reaches the host's own, as from
a container sharing the host's network namespace; every other stays in the guest.

gvproxy reaches the host's 127.0.0.1 at an address of its own (`host_loopback`); it
cannot be sent 127.0.0.1 itself (gVisor's netstack drops a loopback destination that
comes from a NIC). So the guest NATs: in netfilter's nat table, new connections to
127.0.0.1 jump to a chain that DNATs each of those ports to `host_loopback`; leaving by
the NIC, their source (127.0.0.1) is masqueraded, which `route_localnet` allows.

Which ports: the host's listeners, which the host sends (ConfigureNetwork, then
SetHostPorts as they change: it polls its own sockets as it polls the guest's
listeners to publish them), less the guest's own, which the agent polls every POLL_S.
A port only the guest listens on is therefore never the host's, however soon it is
dialled after the guest listens (a process that listens and connects to itself); a
port the host begins to listen on is reached from the guest within about a second.
The chain is rewritten atomically (iptables-restore) when either set changes;
connections already made keep their way (conntrack).
"""

from __future__ import annotations

import asyncio

from harpoon.agent import modules, network
from harpoon.agent.processes import ProcessTable
from harpoon.errdefs import FailedPrecondition

POLL_S = 0.5
LOOPBACK = "127.0.0.1/32"
CHAIN = "HARPOON-LOOPBACK"
IPTABLES_RESTORE = "/usr/sbin/iptables-restore"
# The modules the rules need (and, as their dependencies, nf_nat and nf_conntrack).
NAT_MODULES = ("iptable_nat", "xt_nat", "xt_MASQUERADE", "xt_tcpudp")

Port = tuple[str, int]


def base_rules(interface: str, to_host: set[Port], host_loopback: str) -> str:
    """The nat table: its jumps to CHAIN, CHAIN, the masquerade of what leaves by
    interface (iptables-restore flushes the table first)."""
    return "\n".join([
        "*nat",
        f":{CHAIN} - [0:0]",
        f"-A OUTPUT -d {LOOPBACK} -p tcp -j {CHAIN}",
        f"-A OUTPUT -d {LOOPBACK} -p udp -j {CHAIN}",
        f"-A POSTROUTING -s {LOOPBACK} -o {interface} -j MASQUERADE",
        *_chain(to_host, host_loopback),
        "COMMIT",
        "",
    ])  # fmt: skip


def chain_rules(to_host: set[Port], host_loopback: str) -> str:
    """CHAIN alone, rewritten (for iptables-restore --noflush)."""
    return "\n".join(["*nat", f"-F {CHAIN}", *_chain(to_host, host_loopback), "COMMIT", ""])


def _chain(to_host: set[Port], host_loopback: str) -> list[str]:
    return [
        f"-A {CHAIN} -p {protocol} --dport {port} -j DNAT --to-destination {host_loopback}"
        for protocol, port in sorted(to_host)
    ]


async def _restore(table: ProcessTable, rules: str, flush: bool) -> None:
    # Rules for a few hundred ports: within a pipe's buffer.
    argv = [IPTABLES_RESTORE, *([] if flush else ["--noflush"])]
    code, output = await table.run_helper_to_end(argv, rules.encode())
    if code != 0:
        raise FailedPrecondition(f"iptables-restore failed ({code}): {output}")


class HostLoopback:
    """The NAT of 127.0.0.1 to the host's loopback, kept to the host's ports less the guest's."""

    def __init__(self, table: ProcessTable, host_loopback: str) -> None:
        self.table = table
        self.host_loopback = host_loopback
        self.host_ports: set[Port] = set()
        self.guest_ports: set[Port] = set()
        self._lock = asyncio.Lock()
        self._written: set[Port] | None = None

    async def set_up(self, interface: str, host_ports: set[Port]) -> None:
        for module in NAT_MODULES:
            modules.load(module)
        with open(f"/proc/sys/net/ipv4/conf/{interface}/route_localnet", "w") as sysctl:
            sysctl.write("1")
        self.host_ports = host_ports
        self.guest_ports = network.listening_ports(local=True)
        to_host = self.host_ports - self.guest_ports
        async with self._lock:
            await _restore(self.table, base_rules(interface, to_host, self.host_loopback), True)
            self._written = to_host

    async def set_host_ports(self, ports: set[Port]) -> None:
        self.host_ports = ports
        await self._rewrite()

    async def _rewrite(self) -> None:
        async with self._lock:
            to_host = self.host_ports - self.guest_ports
            if self._written is None or to_host == self._written:
                return
            await _restore(self.table, chain_rules(to_host, self.host_loopback), False)
            self._written = to_host

    async def keep_current(self) -> None:
        """Follows the guest's own listeners, for ever."""
        while True:
            await asyncio.sleep(POLL_S)
            self.guest_ports = network.listening_ports(local=True)
            await self._rewrite()
