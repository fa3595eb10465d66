"""A container's network under harpoon, with ctr (nerdctl and CNI: test_nerdctl_network).

The host's network (`--net-host`) and the ports annotation go through a gvproxy of the
VM's own: the host's 127.0.0.1 is reached at 192.168.127.254, what listens is published
on the host's 127.0.0.1; every address used is the host's loopback.

A network namespace named by path in config.json (as CRI and `--with-ns` name one) is
the VM's: what its owner configured there (here the test: a veth pair, one end in the
namespace, the other on the host, on a subnet the test picks) is what the container
sees, and traffic flows between it and the host. A new namespace with nothing in it
gives the container its loopback alone, up, as under runc. Every address a test sends
to is one it put on a veth of its own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.shim import paths
from harpoon.shim.transform.network import PORTS_ANNOTATION
from tests.e2e.test_harpoon_run import HARPOON, RUN_TIMEOUT_S, ctr_command, leftovers

pytestmark = pytest.mark.vm

HOST_ADDRESS = "10.231.7.1"
CONTAINER_ADDRESS = "10.231.7.2"
PREFIX = 24


@dataclass
class Veth:
    netns: str
    """Its name under /run/netns (`ip netns`)."""
    host_end: str
    mac: str
    """The MAC of its end in the namespace (eth0)."""

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def veth(container_id: str) -> Iterator[Veth]:
    """A namespace with eth0 at CONTAINER_ADDRESS, its peer on the host at HOST_ADDRESS."""
    netns, host_end = f"hp-{container_id[-8:]}", f"hpv{container_id[-8:]}"
    ip("netns", "add", netns)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("address", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", host_end)
        ip("link", "set", host_end, "up")
        ip("-n", netns, "address", "add", f"{CONTAINER_ADDRESS}/{PREFIX}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "route", "add", "default", "via", HOST_ADDRESS)
        (link,) = json.loads(ip("-n", netns, "-j", "link", "show", "eth0"))
        # Only ever our own: the addresses the test sends to are on these two ends.
        assert HOST_ADDRESS in ip("address", "show", "dev", host_end)
        yield Veth(netns, host_end, link["address"])
        links = {link["ifname"] for link in json.loads(ip("-n", netns, "-j", "link", "show"))}
        assert links == {"lo", "eth0"}, "the VM's tap outlived its container"
        qdiscs = json.loads(ip_netns_tc(netns, "-j", "qdisc", "show", "dev", "eth0"))
        assert not [q for q in qdiscs if q.get("kind") == "ingress"], "a redirect outlived it"
    finally:
        subprocess.run(["ip", "link", "delete", host_end], capture_output=True, check=False)
        ip("netns", "delete", netns)


def ip_netns_tc(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "tc", *args], check=True, capture_output=True, text=True
    ).stdout


def run(containerd: Containerd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ctr_command(containerd, "run", "--rm", "--runtime", HARPOON, *args),
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip


def test_a_network_namespace_named_by_path_is_the_containers_and_reaches_the_host(
    containerd: Containerd, busybox_image: str, container_id: str, veth: Veth
) -> None:
    script = "ip -o address show eth0; ip link show eth0; ip route; ping -c 2 -W 5 " + HOST_ADDRESS
    result = run(containerd, "--with-ns", f"network:{veth.path}", busybox_image, container_id,
                 "sh", "-c", script)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"inet {CONTAINER_ADDRESS}/{PREFIX}" in result.stdout
    assert f"link/ether {veth.mac}" in result.stdout  # the veth's: the bridge knows it
    assert f"default via {HOST_ADDRESS} dev eth0" in result.stdout
    assert "2 packets received" in result.stdout
    assert leftovers(containerd, container_id) == []


def test_a_new_network_namespace_alone_gives_the_container_its_loopback_up(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    result = run(containerd, busybox_image, container_id, "sh", "-c",
                 "ip -o link show; ping -c 1 -W 5 127.0.0.1")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    links = [line.split(":")[1].strip() for line in result.stdout.splitlines() if ": <" in line]
    assert links == ["lo"]
    assert "LOWER_UP" in result.stdout and "1 packets received" in result.stdout
    assert leftovers(containerd, container_id) == []
    assert not paths.netns_path(containerd.namespace, container_id).exists()


@pytest.fixture
def host_server() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on the host's 127.0.0.1 that answers each connection with a line."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"hello from the host\n")
                seen.append(b"connected")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        stop.set()
        thread.join()
        server.close()


def fetch(port: int, deadline_s: float) -> str:
    """GET / from 127.0.0.1:port, retried until it answers or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


HTTPD = "mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p {port} -h /www"


def test_the_hosts_network_reaches_the_host_and_publishes_what_listens(
    containerd: Containerd, busybox_image: str, container_id: str,
    host_server: tuple[int, list[bytes]],
) -> None:  # fmt: skip
    """`--net-host`: gvproxy's network. The host's 127.0.0.1 is reached at gvproxy's
    address for it; a port the container listens on is published on the host's."""
    host_port, seen = host_server
    port = free_port()
    # gvproxy's own API at its gateway is out of the guest's reach (the guest drops it).
    api = "if nc -w 3 192.168.127.1 80 </dev/null; then echo API-REACHED; fi; "
    # gvproxy answers its static names itself (nothing asks a resolver off this machine).
    lookup = "nslookup host.containers.internal 192.168.127.1; "
    reach_host = f"nc 192.168.127.254 {host_port} && "
    script = api + lookup + reach_host + HTTPD.format(text="guest-httpd", port=port)
    ctr = subprocess.Popen(
        ctr_command(containerd, "run", "--rm", "--net-host", "--runtime", HARPOON,
                    busybox_image, container_id, "sh", "-c", script),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert fetch(port, RUN_TIMEOUT_S) == "guest-httpd\n"
        assert seen == [b"connected"]
    finally:
        containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
        out, err = ctr.communicate(timeout=RUN_TIMEOUT_S)
    assert "hello from the host" in out, out + err
    assert "API-REACHED" not in out
    assert "Address: 192.168.127.254" in out, out
    assert not listening(port)
    assert leftovers(containerd, container_id) == []


def test_the_ports_annotation_publishes_a_containers_ports_through_gvproxy(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    port = free_port()
    annotation = f"{PORTS_ANNOTATION}=127.0.0.1:{port}:80"
    ctr = subprocess.Popen(
        ctr_command(containerd, "run", "--rm", "--runtime", HARPOON, "--annotation", annotation,
                    busybox_image, container_id, "sh", "-c",
                    "ip -o link show; " + HTTPD.format(text="published", port=80)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert fetch(port, RUN_TIMEOUT_S) == "published\n"
    finally:
        containerd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=False)
        out, err = ctr.communicate(timeout=RUN_TIMEOUT_S)
    # Its own namespace: loopback and the VM's NIC, nothing of the host's.
    links = [line.split(":")[1].strip() for line in out.splitlines() if ": <" in line]
    assert links == ["lo", "eth0"], out + err
    assert not listening(port)
    assert leftovers(containerd, container_id) == []


def test_a_published_port_in_use_fails_create_naming_it_and_leaves_nothing(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run(containerd, "--annotation", f"{PORTS_ANNOTATION}=127.0.0.1:{port}:80",
                     busybox_image, container_id, "true")  # fmt: skip
    assert result.returncode != 0
    assert f"cannot publish 127.0.0.1:{port}:80/tcp" in result.stderr
    assert "in use" in result.stderr
    assert leftovers(containerd, container_id) == []


def test_a_bad_ports_annotation_is_refused_before_any_vm(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    result = run(containerd, "--annotation", f"{PORTS_ANNOTATION}=80:eighty",
                 busybox_image, container_id, "true")  # fmt: skip
    assert result.returncode != 0 and PORTS_ANNOTATION in result.stderr
    assert leftovers(containerd, container_id) == []
