"""nerdctl's networks (CNI: bridge, portmap, firewall) under harpoon, against runc.

Each case is what a user does with nerdctl's networking — publish ports, reach another
container by name, reach a server on the host, look at the network from inside, publish
a port the host already uses, start many containers at once — reduced to facts. Under
runc the facts must be the ones written in the case; under harpoon they must equal
runc's, run just before on the same containerd (runc is the oracle), as in
test_nerdctl.py. `test_a_published_port_serves_from_a_vm_restored_from_a_template` is
harpoon's alone.

The module's two networks, a and b (`hpt-<random>-a` and `-b`: their names must be
unique on the machine), are made once, on /24s under 10.231.0.0/16 that no host address
or route touches, and removed at the end with all CNI left of them (tests/e2e/cni.py).
Every byte stays on this machine: the host talks to its loopback (published ports), to
the gateway of a network of the test's, and to containers of the test's
(`assert_on_this_machine`); containers talk to each other, to that gateway, and resolve
names from nerdctl's /etc/hosts alone — `--dns 127.0.0.1` sends any other lookup to the
container's own loopback, where nothing answers, instead of the host's resolvers. What
differs per run (the containers' addresses, hostnames, ports the kernel picked, the
networks' names and subnets) is replaced by names in the facts.

nerdctl 2.3 does not support containerd 1.6: there every test is skipped saying so.
Runtime here (2 shared cores, TCG): ~70 s for the module once a VM template for a VM
with a NIC exists (a first run builds one, and udp-echo, ~25 s, once per machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from harpoon.sandbox.template import META_NAME, TemplateStore
from harpoon.shim import paths
from tests.e2e import cni, events
from tests.e2e.cni import Network
from tests.e2e.differential import HARPOON, RUNC, SETTLE_TIMEOUT_S, Result
from tests.e2e.nerdctl import Nerdctl
from tests.e2e.test_harpoon_run import leftovers
from tests.e2e.traffic import (
    LOOPBACK,
    REFUSED,
    assert_on_this_machine,
    free_port,
    gateway_server,
    http_get,
    line_server,
    listeners,
    tcp_connect,
    udp_exchange,
    udp_send,
)
from tests.e2e.udp_echo import udp_echo_binary

Facts = dict[str, object]
T = TypeVar("T")
R = TypeVar("R")

#: Names are resolved from /etc/hosts alone (the module's docstring says why).
DNS = ("--dns", LOOPBACK)
#: How long a container's remains get to go once `nerdctl rm -f` returned (harpoon's
#: VMM exits just after its shim answered).
GONE_TIMEOUT_S = SETTLE_TIMEOUT_S
POLL_INTERVAL_S = 0.2
#: How long a cold-booted VM's template build may take (test_harpoon_templates').
BUILD_WAIT_S = 300.0
#: Where harpoon pins the network namespaces it makes (harpoon.shim.paths.netns_path).
HARPOON_NETNS_DIR = Path(paths.RUN_DIR) / "netns"
#: Where nerdctl's hook keeps a container's port reserver's pid (pkg/ocihook).
NERDCTL_RUN_DIR = Path("/run/nerdctl")
#: How many containers `many_at_once` starts together.
CONCURRENT_CONTAINERS = 5


@dataclass(frozen=True)
class Networks:
    a: Network
    """The network most cases use."""
    b: Network
    """Another one, whose containers must not reach a's."""


@pytest.fixture(scope="module")
def networks(nerdctl_session: Nerdctl) -> Iterator[Networks]:
    """The module's two networks, removed at its end with all CNI left of them."""
    first, second = cni.free_subnets(2)
    # Unique on the machine (tests/e2e/cni.py says why).
    prefix = f"hpt-{secrets.token_hex(3)}"
    left: list[str] = []

    def remove(network: Network) -> None:
        left.extend(cni.remove(nerdctl_session, network))

    with contextlib.ExitStack() as stack:
        made = []
        for name, subnet in ((f"{prefix}-a", first), (f"{prefix}-b", second)):
            made.append(cni.create(nerdctl_session, name, subnet))
            stack.callback(remove, made[-1])
        yield Networks(*made)
    assert left == [], "nerdctl network rm left these behind"


def concurrently(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """function over items, each in its own thread; the results in items' order."""
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(function, items))


def outcome(run: Result, prefix: str = "", names: dict[str, str] | None = None) -> Facts:
    """A command's status, stdout and stderr as facts (named `prefix`…), with what
    differs per run in its output `replaced` by `names`."""
    return {f"{prefix}status": run.status, f"{prefix}stdout": replaced(run.out, names or {}),
            f"{prefix}stderr": replaced(run.err, names or {})}  # fmt: skip


def replaced(text: str, names: dict[str, str]) -> str:
    """text with each key (longest first, so that no key's prefix hides it) replaced by
    its name."""
    for key in sorted(names, key=len, reverse=True):
        text = text.replace(key, names[key])
    return text


def network_names(network: Network) -> dict[str, str]:
    """What differs per run in a network's name and addresses, and their names in the
    facts."""
    return {
        network.name: "<network>",
        str(network.subnet): "<subnet>",
        str(network.subnet.broadcast_address): "<broadcast>",
        str(network.gateway): "<gateway>",
    }


def inspect(nerdctl: Nerdctl, name: str, field: str) -> str:
    return nerdctl.check("inspect", "--format", f"{{{{{field}}}}}", name).strip()


def address_of(nerdctl: Nerdctl, name: str, network: Network) -> str:
    """The container's address as nerdctl inspect shows it, checked to be in network."""
    address = inspect(nerdctl, name, ".NetworkSettings.IPAddress")
    assert_on_this_machine(address, [network])
    return address


def serving(nerdctl: Nerdctl, name: str, network: Network) -> str:
    """Waits until the container's httpd answers on its address (from the host, over
    the network's bridge), which is returned."""
    address = address_of(nerdctl, name, network)
    answer = http_get(80, host=address)
    assert answer.startswith("200 "), f"{name} at {address}: {answer}"
    return address


def httpd_serving(name: str) -> tuple[str, ...]:
    """A container command serving "served by NAME" on port 80."""
    return ("sh", "-c",
            f"mkdir -p /www && echo served by {name} > /www/index.html"
            " && exec httpd -f -p 80 -h /www")  # fmt: skip


# -- the cases -------------------------------------------------------------------------

#: Serves a page on 80 and another on 8080, the container's view of eth0 at
#: /address, and echoes UDP datagrams on 5353.
WEB_SCRIPT = (
    "mkdir -p /www80 /www8080 && echo served on 80 > /www80/index.html"
    " && echo served on 8080 > /www8080/index.html"
    " && ip -o -4 address show dev eth0 > /www80/address"
    " && httpd -p 80 -h /www80 && httpd -p 8080 -h /www8080 && exec /udp-echo 5353"
)


def published_ports(nerdctl: Nerdctl, runtime: str, networks: Networks) -> Facts:
    """`run -d -p 127.0.0.1:PORT:80 -p …:8080 -p …:5353/udp`: the host gets each port's
    answer; nerdctl inspect's IPAddress is the container's eth0 address and nerdctl port
    lists the three; portmap's DNAT rules serve them, and nerdctl's port reserver (a
    process its hook starts) holds them on the host; once `nerdctl rm -f` returned, each
    port is refused, no rule names it and nothing holds it."""
    ports = {"80/tcp": free_port(), "8080/tcp": free_port(), "5353/udp": free_port()}
    names = {str(port): f"<{spec}>" for spec, port in ports.items()}
    publish = [flag for spec, port in ports.items() for flag in ("-p", f"{LOOPBACK}:{port}:{spec}")]
    run = nerdctl.run(
        runtime, "-d", "--name", "hpt-web", *DNS, *publish,
        "-v", f"{udp_echo_binary()}:/udp-echo:ro", nerdctl.image, "sh", "-c", WEB_SCRIPT,
        net=networks.a.name,
    )  # fmt: skip
    try:
        served = {
            "80/tcp": http_get(ports["80/tcp"]),
            "8080/tcp": http_get(ports["8080/tcp"]),
            "5353/udp": udp_exchange(ports["5353/udp"], b"ping over udp"),
        }
        eth0 = http_get(ports["80/tcp"], "/address")
        inspected = address_of(nerdctl, "hpt-web", networks.a)
        listed = nerdctl.check("port", "hpt-web")
        rules = {spec: bool(cni.port_rules([port])) for spec, port in ports.items()}
        listening = listeners(ports.values())
    finally:
        removed = nerdctl("rm", "--force", "hpt-web")
    after = {
        "80/tcp": tcp_connect(ports["80/tcp"]),
        "8080/tcp": tcp_connect(ports["8080/tcp"]),
        "5353/udp": udp_send(ports["5353/udp"]),
    }
    seen = re.search(r" inet ([0-9.]+)/", eth0)
    in_container = {inspected: "<IPAddress>", **network_names(networks.a)}
    return {
        "run status": run.status, "run stderr": run.err,
        "served": served,
        "eth0 in the container": replaced(eth0, in_container),
        "IPAddress is eth0's": seen is not None and seen.group(1) == inspected,
        "nerdctl port": sorted(replaced(listed, names).splitlines()),
        "portmap rules while it ran": rules,
        "host listeners while it ran": sorted(replaced(entry, names) for entry in listening),
        **outcome(removed, "rm "),
        "after rm": after,
        "rules after rm": cni.port_rules(ports.values()),
        "host listeners after rm": listeners(ports.values()),
    }  # fmt: skip


def names_on_a_network(nerdctl: Nerdctl, runtime: str, networks: Networks) -> Facts:
    """Two containers on network a fetch each other's page by container name; a third,
    on network b, can neither resolve their names nor connect to their address."""
    members = ("hpt-a1", "hpt-a2")
    started = concurrently(
        lambda name: nerdctl.run(runtime, "-d", "--name", name, *DNS, nerdctl.image,
                                 *httpd_serving(name), net=networks.a.name),
        members,
    )  # fmt: skip
    try:
        address = {name: serving(nerdctl, name, networks.a) for name in members}
        fetched = {
            f"{client} -> {server}": outcome(
                nerdctl("exec", client, "wget", "-q", "-O", "-", f"http://{server}/")
            )
            for client, server in (members, members[::-1])
        }
        script = (
            "wget -q -O - http://hpt-a1/; echo status=$?;"
            f" nc -w 3 {address['hpt-a1']} 80 </dev/null; echo status=$?"
        )
        outsider = nerdctl.run(runtime, "--rm", *DNS, nerdctl.image, "sh", "-c", script,
                               net=networks.b.name)  # fmt: skip
    finally:
        removed = nerdctl("rm", "--force", *members)
    return {
        "run statuses": [run.status for run in started],
        **fetched,
        "outsider": outcome(outsider, names={address["hpt-a1"]: "<a1>"}),
        "rm status": removed.status,
    }


def the_gateway(nerdctl: Nerdctl, runtime: str, networks: Networks) -> Facts:
    """A container on network a connects to a server of the test's on the host, bound to
    the network's gateway address alone; with `--net none` the same fails, and lo is up."""
    with gateway_server(networks.a) as server:
        script = (
            f"echo ping from the container | nc -w 5 {server.address} {server.port}; echo status=$?"
        )
        joined = nerdctl.run(runtime, "--rm", *DNS, nerdctl.image, "sh", "-c", script,
                             net=networks.a.name)  # fmt: skip
        alone = nerdctl.run(
            runtime, "--rm", nerdctl.image, "sh", "-c", f"ip -o link show lo; {script}"
        )
    # The server's address is the bridge's, on the host (made by the first container).
    on_bridge = server.address in cni.addresses_of(networks.a.bridge)
    names = {**network_names(networks.a), str(server.port): "<port>"}
    return {
        "on network a": outcome(joined, names=names),
        "with --net none": outcome(alone, names=names),
        "the server received": server.received,
        "its address is the bridge's": on_bridge,
    }


def the_hosts_network(nerdctl: Nerdctl, runtime: str, networks: Networks) -> Facts:
    """`--net host`: a server of the test's on the host's 127.0.0.1 is reached at
    127.0.0.1, and a server the container starts is reached on the host's 127.0.0.1
    (under harpoon: gvproxy's network, the guest's NAT of 127.0.0.1, its listeners
    published); the port is free again once the container is removed."""
    web = free_port()
    with line_server(LOOPBACK) as server:
        script = (
            f"echo ping from the container | nc -w 5 {LOOPBACK} {server.port}; "
            f"echo status=$?; mkdir -p /www && echo served > /www/index.html && "
            f"exec httpd -f -p {web} -h /www"
        )
        started = nerdctl.run(runtime, "-d", "--name", "hpt-host", *DNS, nerdctl.image,
                              "sh", "-c", script, net="host")  # fmt: skip
        try:
            page = http_get(web)
            logs = nerdctl("logs", "hpt-host")
        finally:
            removed = nerdctl("rm", "-f", "hpt-host")
    return {
        "run status": started.status,
        "container's output": logs.out,
        "the server received": server.received,
        "the host got": page,
        "rm status": removed.status,
        "listening after rm": listeners([web]),
    }


VIEW_SCRIPT = (
    "ip -o address; echo; ip route; echo; cat /etc/hosts; echo; cat /etc/resolv.conf;"
    " echo; hostname"
)


def the_view_from_inside(nerdctl: Nerdctl, runtime: str, networks: Networks) -> Facts:
    """What a container on network a sees: its addresses (their shape: names, prefixes,
    scopes, broadcast), routes, /etc/hosts, /etc/resolv.conf, hostname."""
    run = nerdctl.run(runtime, "--rm", "--name", "hpt-view", *DNS, nerdctl.image,
                      "sh", "-c", VIEW_SCRIPT, net=networks.a.name)  # fmt: skip
    text = run.out
    names = network_names(networks.a)
    ipv4 = re.search(r"eth0\s+inet ([0-9.]+)/", text)
    if ipv4:
        names[ipv4.group(1)] = "<address>"
        assert_on_this_machine(ipv4.group(1), [networks.a])
        # nerdctl pads the address column of /etc/hosts: its width is the address's.
        text = re.sub(re.escape(ipv4.group(1)) + " +", f"{ipv4.group(1)} ", text)
    ipv6 = re.search(r"eth0\s+inet6 (fe80:[0-9a-f:]+)/", text)
    if ipv6:
        names[ipv6.group(1)] = "<link-local>"
    hostname = text.rstrip("\n").rsplit("\n", 1)[-1]
    names[hostname] = "<hostname>"
    # Duplicate address detection of the link-local address may still run as the
    # command does (a VM's NIC comes up just before its container starts).
    text = text.replace(" tentative ", " ")
    return {"status": run.status, "stdout": replaced(text, names), "stderr": run.err}


def a_port_in_use(nerdctl: Nerdctl, runtime: str, networks: Networks) -> Facts:
    """`run -p 127.0.0.1:PORT:80` of a port the host listens on already fails, saying
    so, and nothing is left: no container, no rule, no socket but the test's. nerdctl
    refuses the port as it reads its flags (pkg/portutil), before it asks containerd for
    anything: containerd publishes no event (no container, no task), so no shim ran
    and no VM, namespace or tap was made (the host's lists of those are not compared:
    other test sessions on this machine make and remove theirs at any time)."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, port))
        taken.listen()
        with events.published(nerdctl.containerd) as published:
            run = nerdctl.run(runtime, "-d", "--name", "hpt-busy", *DNS, "-p",
                              f"{LOOPBACK}:{port}:80", nerdctl.image, "sleep", "1000",
                              net=networks.a.name)  # fmt: skip
        listening = listeners([port])
    daemon = nerdctl.containerd
    return {
        **outcome(run, names={str(port): "<port>"}),
        "containerd's events": published,
        "nerdctl ps -a": nerdctl.containers(),
        "containerd's containers, tasks, shims": (
            daemon.containers(),
            daemon.tasks(),
            [str(shim) for shim in daemon.shims()],
        ),
        "rules naming the port": cni.port_rules([port]),
        "host sockets on the port": [replaced(entry, {str(port): "<port>"}) for entry in listening],
    }


@dataclass(frozen=True)
class Trace:
    """What a running container left to recognise its remains by."""

    id: str
    pid: int
    netns_inode: int
    address: str

    @classmethod
    def of(cls, nerdctl: Nerdctl, name: str, network: Network) -> Trace:
        pid = int(inspect(nerdctl, name, ".State.Pid"))
        return cls(
            inspect(nerdctl, name, ".ID"), pid, os.stat(f"/proc/{pid}/ns/net").st_ino,
            address_of(nerdctl, name, network),
        )  # fmt: skip


def namespaces_alive(inodes: set[int]) -> list[str]:
    """Processes in, and files pinning, a network namespace of these inodes."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.append(f"process {entry}")
    for directory in (Path("/run/netns"), HARPOON_NETNS_DIR):
        for pinned in directory.glob("*") if directory.exists() else ():
            with contextlib.suppress(OSError):
                if pinned.stat().st_ino in inodes:
                    found.append(f"namespace file {pinned}")
    return found


def remains(nerdctl: Nerdctl, traces: Sequence[Trace], ports: Sequence[int],
            network: Network) -> list[str]:  # fmt: skip
    """Everything of these (removed) containers still on the host: harpoon's VM, state,
    share, socket and namespace; nerdctl's port reserver (a process of its hook holding
    the published ports) and its state; their network namespaces; a VM's tap, moved out
    (harpoon.net.wire.after_cni names it hp<pid>t<VMM pid>); veths on the bridge;
    redirects; iptables rules naming their ports, IDs or addresses."""
    found = []
    for trace in traces:
        found += leftovers(nerdctl.containerd, trace.id)
        state = NERDCTL_RUN_DIR / nerdctl.containerd.namespace / trace.id
        if state.exists():
            found.append(f"nerdctl's {state}")
    found += [f"host socket {entry}" for entry in listeners(ports)]
    found += namespaces_alive({trace.netns_inode for trace in traces})
    taps = {f"t{trace.pid % 100000}" for trace in traces}
    found += [
        f"link {link}"
        for link in os.listdir("/sys/class/net")
        if link == "tap0" or (link.startswith("hp") and link.endswith(tuple(taps)))
    ]
    found += [f"{link} on {network.bridge}" for link in cni.bridge_ports(network)]
    if cni.bridge_has_ingress_qdisc(network):
        found.append(f"an ingress qdisc on {network.bridge}")
    needles = [*(f"--dport {port} " for port in ports),
               *(trace.id for trace in traces),
               *(f"{trace.address}/32" for trace in traces),
               *(f"{trace.address}:" for trace in traces)]  # fmt: skip
    found += [f"iptables -t {table} {rule}" for table, rule in cni.iptables_rules(*needles)]
    return found


def eventually_gone(check: Callable[[], list[str]]) -> list[str]:
    """What check still finds once it found nothing or GONE_TIMEOUT_S passed."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    found = check()
    while found and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        found = check()
    return found


def many_at_once(nerdctl: Nerdctl, runtime: str, networks: Networks) -> Facts:
    """CONCURRENT_CONTAINERS containers, each publishing a port, started together: each
    port serves its container's page; once all are removed nothing of them is left."""
    names = [f"hpt-c{index}" for index in range(CONCURRENT_CONTAINERS)]
    ports = {name: free_port() for name in names}
    runs = concurrently(
        lambda name: nerdctl.run(runtime, "-d", "--name", name, *DNS,
                                 "-p", f"{LOOPBACK}:{ports[name]}:80", nerdctl.image,
                                 *httpd_serving(name), net=networks.a.name),
        names,
    )  # fmt: skip
    traces: list[Trace] = []
    try:
        served = dict(zip(names, concurrently(lambda n: http_get(ports[n]), names), strict=True))
        traces = [Trace.of(nerdctl, name, networks.a) for name in names]
    finally:
        removed = nerdctl("rm", "--force", *names)
    left = eventually_gone(lambda: remains(nerdctl, traces, list(ports.values()), networks.a))
    return {
        "run statuses": [run.status for run in runs],
        "served": served,
        "rm status": removed.status,
        "traced": len(traces),
        "left": left,
    }


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Nerdctl, str, Networks], Facts]
    #: What runc gives (the facts the case returns, every one).
    expected: Facts


#: How `ip -o address` ends an address's line.
FOREVER = "\\       valid_lft forever preferred_lft forever"
REFUSED_ALL = {"80/tcp": REFUSED, "8080/tcp": REFUSED, "5353/udp": REFUSED}

CASES = [
    Case("published-ports", published_ports, {
        "run status": 0, "run stderr": "",
        "served": {"80/tcp": "200 served on 80\n", "8080/tcp": "200 served on 8080\n",
                   "5353/udp": "ping over udp"},
        "eth0 in the container":
            f"200 2: eth0    inet <IPAddress>/24 brd <broadcast> scope global eth0{FOREVER}\n",
        "IPAddress is eth0's": True,
        "nerdctl port": ["5353/udp -> 127.0.0.1:<5353/udp>", "80/tcp -> 127.0.0.1:<80/tcp>",
                         "8080/tcp -> 127.0.0.1:<8080/tcp>"],
        "portmap rules while it ran": {"80/tcp": True, "8080/tcp": True, "5353/udp": True},
        "host listeners while it ran": ["tcp:<80/tcp>", "tcp:<8080/tcp>", "udp:<5353/udp>"],
        "rm status": 0, "rm stdout": "hpt-web\n", "rm stderr": "",
        "after rm": REFUSED_ALL, "rules after rm": [], "host listeners after rm": [],
    }),
    Case("names-on-a-network", names_on_a_network, {
        "run statuses": [0, 0],
        "hpt-a1 -> hpt-a2": {"status": 0, "stdout": "served by hpt-a2\n", "stderr": ""},
        "hpt-a2 -> hpt-a1": {"status": 0, "stdout": "served by hpt-a1\n", "stderr": ""},
        # Its name is not in b's /etc/hosts; b's bridge may not forward to a's
        # (CNI's firewall plugin, ingressPolicy same-bridge): nc's SYNs are dropped.
        "outsider": {"status": 0, "stdout": "status=1\nstatus=1\n",
                     "stderr": "wget: bad address 'hpt-a1'\nnc: timed out\n"},
        "rm status": 0,
    }),
    Case("the-gateway", the_gateway, {
        "on network a": {"status": 0, "stdout": "pong from the host\nstatus=0\n", "stderr": ""},
        "with --net none": {
            "status": 0,
            "stdout": "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue qlen 1000\\"
                      "    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\nstatus=1\n",
            "stderr": "nc: can't connect to remote host (<gateway>): Network is unreachable\n",
        },
        "the server received": ["ping from the container\n"],
        "its address is the bridge's": True,
    }),
    Case("the-view-from-inside", the_view_from_inside, {
        "status": 0, "stderr": "",
        "stdout": "".join(line + "\n" for line in (
            f"1: lo    inet 127.0.0.1/8 scope host lo{FOREVER}",
            f"1: lo    inet6 ::1/128 scope host {FOREVER}",
            f"2: eth0    inet <address>/24 brd <broadcast> scope global eth0{FOREVER}",
            f"2: eth0    inet6 <link-local>/64 scope link {FOREVER}",
            "",
            "default via <gateway> dev eth0 ",
            "<subnet> dev eth0 scope link  src <address> ",
            "",
            "# <nerdctl>",
            "127.0.0.1\tlocalhost localhost.localdomain",
            "::1\t\tlocalhost localhost.localdomain",
            "<address> <hostname> <hostname>.<network> hpt-view hpt-view.<network>",
            "# </nerdctl>",
            "",
            "nameserver 127.0.0.1",
            "",
            "<hostname>",
        )),
    }),
    Case("the-hosts-network", the_hosts_network, {
        "run status": 0,
        "container's output": "pong from the host\nstatus=0\n",
        "the server received": ["ping from the container\n"],
        "the host got": "200 served\n",
        "rm status": 0,
        "listening after rm": [],
    }),
    Case("a-port-in-use", a_port_in_use, {
        "status": 1, "stdout": "",
        "stderr": 'time="<time>" level=fatal msg="failed to load networking flags: bind for'
                  ' 127.0.0.1:<port> failed: port is already allocated"\n',
        "containerd's events": [], "nerdctl ps -a": [],
        "containerd's containers, tasks, shims": ([], [], []),
        "rules naming the port": [], "host sockets on the port": ["tcp:<port>"],
    }),
    Case("many-at-once", many_at_once, {
        "run statuses": [0] * CONCURRENT_CONTAINERS,
        "served": {f"hpt-c{index}": f"200 served by hpt-c{index}\n"
                   for index in range(CONCURRENT_CONTAINERS)},
        "rm status": 0, "traced": CONCURRENT_CONTAINERS, "left": [],
    }),
]  # fmt: skip


def run_case(nerdctl: Nerdctl, case: Case, runtime: str, networks: Networks) -> Facts:
    """The case's facts under `runtime`, and which containers nerdctl left (none)."""
    facts = case.run(nerdctl, runtime, networks)
    return {**facts, "containers left": nerdctl.containers()}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_nerdctl_network_under_runc(nerdctl: Nerdctl, networks: Networks, case: Case) -> None:
    facts = run_case(nerdctl, case, RUNC, networks)
    assert facts == {**case.expected, "containers left": []}


@pytest.mark.vm
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_nerdctl_network_under_harpoon_matches_runc(
    nerdctl: Nerdctl, networks: Networks, case: Case
) -> None:
    runc = run_case(nerdctl, case, RUNC, networks)
    assert runc == {**case.expected, "containers left": []}, "runc, the oracle, changed"
    assert run_case(nerdctl, case, HARPOON, networks) == runc


# -- a lost shim ------------------------------------------------------------------------


@pytest.mark.vm
def test_a_killed_shims_network_is_torn_down_by_its_delete(
    nerdctl: Nerdctl, networks: Networks
) -> None:
    """A harpoon shim SIGKILLed with its container running: containerd runs `shim
    delete`, which runs the poststop hooks the shim did not get to (as runc's `delete
    --force` does), so nerdctl's hook releases the published port's rules and the
    container's address, as for a container that ended normally."""
    port = free_port()
    run = nerdctl.run(HARPOON, "-d", "--name", "hpt-lost", *DNS, "-p", f"{LOOPBACK}:{port}:80",
                      nerdctl.image, *httpd_serving("hpt-lost"), net=networks.a.name)  # fmt: skip
    assert run.status == 0, run.err
    container_id = inspect(nerdctl, "hpt-lost", ".ID")
    address = address_of(nerdctl, "hpt-lost", networks.a)
    try:
        assert http_get(port) == "200 served by hpt-lost\n"
        assert cni.port_rules([port]), "portmap made no rule for the port"
        [shim] = [s for s in nerdctl.containerd.shims() if s.flag("id") == container_id]
        os.kill(shim.pid, 9)
        rules = eventually_gone(lambda: cni.port_rules([port]))
        reserved = eventually_gone(lambda: reservations_of(networks.a, address))
    finally:
        nerdctl("rm", "--force", "hpt-lost")
    assert rules == [], "the dead shim's port rules outlived it"
    assert reserved == [], "the dead shim's address stayed reserved"
    assert tcp_connect(port) == REFUSED


def reservations_of(network: Network, address: str) -> list[str]:
    """host-local's reservation files of `address` in `network` (nerdctl's CNI state)."""
    return [str(path) for path in Path("/var/lib/cni/networks", network.name).glob(address)]


# -- nginx from a Debian image --------------------------------------------------------

#: What the nginx case finds under runc (and must find under harpoon).
NGINX_EXPECTED: Facts = {
    "run status": 0, "run stderr": "",
    "served": "200 served by nginx\n",
    "requests logged": ["GET / HTTP/1.1"],
    "rm status": 0, "after rm": REFUSED, "rules after rm": [],
}  # fmt: skip


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with an index.html, for nginx's document root."""
    (tmp_path / "index.html").write_text("served by nginx\n")
    tmp_path.chmod(0o755)
    return tmp_path


def logged_requests(nerdctl: Nerdctl, name: str) -> list[str]:
    """The request lines of nginx's access log (the image sends it to stdout), once
    there is one or GONE_TIMEOUT_S passed: the log line is written after the answer."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while True:
        logs = nerdctl.check("logs", name)
        requests = [line.split('"')[1] for line in logs.splitlines() if line.count('"') >= 2]
        if requests or time.monotonic() > deadline:
            return requests
        time.sleep(POLL_INTERVAL_S)


def nginx_published(
    nerdctl: Nerdctl, runtime: str, networks: Networks, image: str, site: Path
) -> Facts:
    """`run -d -p 127.0.0.1:PORT:80 -v SITE:/var/www/html:ro` of the Debian image's own
    command (nginx): the host gets the site's page, and `nerdctl logs` the request;
    once `nerdctl rm -f` returned, the port is refused and no rule names it."""
    port = free_port()
    run = nerdctl.run(runtime, "-d", "--name", "hpt-nginx", *DNS,
                      "-p", f"{LOOPBACK}:{port}:80", "-v", f"{site}:/var/www/html:ro",
                      image, net=networks.a.name)  # fmt: skip
    try:
        served = http_get(port)
        requests = logged_requests(nerdctl, "hpt-nginx")
    finally:
        removed = nerdctl("rm", "--force", "hpt-nginx")
    return {
        "run status": run.status, "run stderr": run.err,
        "served": served, "requests logged": requests,
        "rm status": removed.status, "after rm": tcp_connect(port),
        "rules after rm": cni.port_rules([port]),
    }  # fmt: skip


def test_nginx_from_a_debian_image_under_runc(
    nerdctl: Nerdctl, networks: Networks, debian_web_image: str, site: Path
) -> None:
    assert nginx_published(nerdctl, RUNC, networks, debian_web_image, site) == NGINX_EXPECTED


@pytest.mark.vm
def test_nginx_from_a_debian_image_under_harpoon_matches_runc(
    nerdctl: Nerdctl, networks: Networks, debian_web_image: str, site: Path
) -> None:
    runc = nginx_published(nerdctl, RUNC, networks, debian_web_image, site)
    assert runc == NGINX_EXPECTED, "runc, the oracle, changed"
    assert nginx_published(nerdctl, HARPOON, networks, debian_web_image, site) == runc


# -- a VM restored from a template -----------------------------------------------------


def templates(store: TemplateStore) -> set[str]:
    return {meta.parent.name for meta in store.root.glob(f"*/{META_NAME}")}


def restored(nerdctl: Nerdctl, container_id: str) -> bool:
    """Whether the shim logged this container's VM as restored from a template
    (harpoon.sandbox.sandbox logs it to containerd's log, as test_harpoon_templates
    reads it)."""
    log = nerdctl.containerd.log_path.read_text(errors="replace")
    return f"restored {container_id} from template" in log


@pytest.mark.vm
@pytest.mark.parametrize("server", ["busybox-httpd", "debian-nginx"])
def test_a_published_port_serves_from_a_vm_restored_from_a_template(
    nerdctl: Nerdctl, networks: Networks, server: str, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """The first container with a NIC may boot cold (no template for a VM with one yet):
    it then leaves one built behind it (harpoon.sandbox.template_builder), and the next
    must restore from it and serve its published port as a cold-booted VM does: busybox's
    httpd, and nginx of the Debian image serving a bind-mounted directory."""
    store = TemplateStore.from_environment()
    if store is None:
        pytest.skip("VM templates are turned off ($HARPOON_TEMPLATES)")
    if server == "debian-nginx":
        (tmp_path / "index.html").write_text("served by hpt-restored\n")
        tmp_path.chmod(0o755)
        image: tuple[str, ...] = ("-v", f"{tmp_path}:/var/www/html:ro",
                                  request.getfixturevalue("debian_web_image"))  # fmt: skip
    else:
        image = (nerdctl.image, *httpd_serving("hpt-restored"))
    for attempt in ("first", "after its template was built"):
        known = templates(store)
        port = free_port()
        run = nerdctl.run(HARPOON, "-d", "--name", "hpt-restored", *DNS,
                          "-p", f"{LOOPBACK}:{port}:80", *image, net=networks.a.name)  # fmt: skip
        assert run.status == 0, run.err
        try:
            container_id = inspect(nerdctl, "hpt-restored", ".ID")
            answer = http_get(port)
            was_restored = restored(nerdctl, container_id)
        finally:
            nerdctl.check("rm", "--force", "hpt-restored")
        if was_restored:
            break
        assert attempt == "first", "a VM booted cold although its template had been built"
        deadline = time.monotonic() + BUILD_WAIT_S
        while not templates(store) - known:
            assert time.monotonic() < deadline, "no template was built after a cold boot"
            time.sleep(POLL_INTERVAL_S)
    assert answer == "200 served by hpt-restored\n"
    assert eventually_gone(lambda: cni.port_rules([port])) == []
    assert tcp_connect(port) == "refused"
