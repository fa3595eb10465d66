"""The host's loopback seen from a guest that shares the host's network (gvproxy's
user-mode network): a connection to 127.0.0.1 on a TCP or UDP port nothing in the
guest listens on reaches the host's own 127.0.0.1, as from a container sharing the
host's network namespace; a port something in the guest listens on stays the guest's.

gvproxy reaches the host's 127.0.0.1 at an address of its own (`host_loopback`); it
cannot be sent 127.0.0.1 itself (gVisor's netstack drops a loopback destination that
comes from a NIC). So the guest NATs: in netfilter's nat table, new connections to
127.0.0.1 jump to a chain that returns for each port the guest listens on and
DNATs the rest to `host_loopback`; leaving by the NIC, their source (127.0.0.1) is
masqueraded, which `route_localnet` allows. The chain is rewritten (iptables-restore,
atomically) whenever the set of listening ports changes: the agent polls the guest's
sockets every POLL_S, so a port that starts listening is the guest's within that
time; until then a new connection to it goes to the host. Connections already made
keep their way (conntrack).
"""

from __future__ import annotations

import asyncio
import os

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


def base_rules(interface: str, listening: set[Port], host_loopback: str) -> str:
    """The nat table: its jumps to CHAIN, CHAIN, the masquerade of what leaves by
    interface (iptables-restore flushes the table first)."""
    return "\n".join([
        "*nat",
        f":{CHAIN} - [0:0]",
        f"-A OUTPUT -d {LOOPBACK} -p tcp -j {CHAIN}",
        f"-A OUTPUT -d {LOOPBACK} -p udp -j {CHAIN}",
        f"-A POSTROUTING -s {LOOPBACK} -o {interface} -j MASQUERADE",
        *_chain(listening, host_loopback),
        "COMMIT",
        "",
    ])  # fmt: skip


def chain_rules(listening: set[Port], host_loopback: str) -> str:
    """CHAIN alone, rewritten (for iptables-restore --noflush)."""
    return "\n".join(["*nat", f"-F {CHAIN}", *_chain(listening, host_loopback), "COMMIT", ""])


def _chain(listening: set[Port], host_loopback: str) -> list[str]:
    """The guest's own ports return; the rest go to the host."""
    returns = [
        f"-A {CHAIN} -p {protocol} --dport {port} -j RETURN" for protocol, port in sorted(listening)
    ]
    return [*returns, f"-A {CHAIN} -j DNAT --to-destination {host_loopback}"]


async def _restore(table: ProcessTable, rules: str, flush: bool) -> None:
    read_end, write_end = os.pipe()
    output_read, output_write = os.pipe()
    try:
        status = table.run_helper(
            [IPTABLES_RESTORE, *([] if flush else ["--noflush"])],
            (read_end, output_write, output_write),
        )
    finally:
        os.close(read_end)
        os.close(output_write)
    try:
        os.write(write_end, rules.encode())  # a few hundred bytes: within a pipe's buffer
        os.close(write_end)
        write_end = -1
        code = await status
        output = os.read(output_read, 4096).decode(errors="replace").strip()
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(output_read)
    if code != 0:
        raise FailedPrecondition(f"iptables-restore failed ({code}): {output}")


async def set_up(table: ProcessTable, interface: str, host_loopback: str) -> set[Port]:
    """The NAT of 127.0.0.1, for the guest's listening ports as they are now."""
    for module in NAT_MODULES:
        modules.load(module)
    with open(f"/proc/sys/net/ipv4/conf/{interface}/route_localnet", "w") as sysctl:
        sysctl.write("1")
    listening = network.listening_ports(local=True)
    await _restore(table, base_rules(interface, listening, host_loopback), True)
    return listening


async def keep_current(table: ProcessTable, host_loopback: str, listening: set[Port]) -> None:
    """Rewrites CHAIN whenever the guest's listening ports change, for ever."""
    while True:
        await asyncio.sleep(POLL_S)
        now = network.listening_ports(local=True)
        if now != listening:
            await _restore(table, chain_rules(now, host_loopback), False)
            listening = now
