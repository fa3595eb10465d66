"""The real gvproxy (v0.8.9, built by scripts/install-deps) started, driven and stopped
by harpoon.net.gvproxy, with no VM: its API answers, published ports listen on the
host's loopback and free it again, and a fake guest NIC on its QEMU socket
(tests/unit/fake_guest_nic.py) sees the network harpoon configured.

Everything stays on this machine: ports on 127.0.0.1, and every gvproxy here has
upstream DNS off (resolve_upstream=False) and is asked only A queries, which that
keeps inside gvproxy.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from harpoon.devenv.tools import GVPROXY
from harpoon.net.gvproxy import DnsRecord, DnsZone, Gvproxy, GvproxyConfig, start_gvproxy
from harpoon.net.gvproxy_api import AlreadyExposed, NotExposed, PortInUse
from tests.prerequisites import unavailable
from tests.unit.fake_guest_nic import IP_PROTOCOL_TCP, IP_PROTOCOL_UDP, FakeGuestNic

LOOPBACK = "127.0.0.1"
NXDOMAIN = 3
CONNECT_TIMEOUT_S = 5.0


@pytest.fixture
def binary() -> str:
    if GVPROXY.missing_binaries():
        unavailable(f"gvproxy is not built: {GVPROXY.install_hint()}")
    return str(GVPROXY.binary)


def network(state_dir: Path) -> GvproxyConfig:
    web = DnsZone("harpoon.internal.", (DnsRecord("web", IPv4Address("192.168.127.2")),))
    return GvproxyConfig(state_dir, dns_zones=(web,), resolve_upstream=False)


@pytest.fixture
def gvproxy(binary: str, tmp_path: Path) -> Iterator[Gvproxy]:
    with start_gvproxy(network(tmp_path / "vm"), binary) as started:
        yield started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def listens(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except ConnectionRefusedError:
        return False


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_it_answers_on_its_api_and_publishes_nothing_of_its_own(gvproxy: Gvproxy) -> None:
    # Without a config file gvproxy would publish the guest's ssh at 127.0.0.1:2222.
    assert gvproxy.api.exposed() == []
    assert gvproxy.config.net_socket.is_socket()
    assert "gvproxy version v0.8.9" in gvproxy.log_tail()


def test_a_published_port_listens_on_the_host_until_unpublished(gvproxy: Gvproxy) -> None:
    port = free_port()
    forward = gvproxy.api.expose("tcp", LOOPBACK, port, 80)
    assert gvproxy.api.exposed() == [forward]
    assert listens(port)
    gvproxy.api.unexpose("tcp", LOOPBACK, port)
    assert gvproxy.api.exposed() == []
    assert not listens(port)
    with socket.socket() as again:
        # SO_REUSEADDR: the connection `listens` made may linger in TIME_WAIT.
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((LOOPBACK, port))
        again.listen()  # free for anyone


def test_a_port_in_use_on_the_host_is_refused_naming_it(gvproxy: Gvproxy) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"host port {port} is in use"):
            gvproxy.api.expose("tcp", LOOPBACK, port, 80)
    assert gvproxy.api.exposed() == []


def test_publishing_twice_and_unpublishing_what_is_not_are_errors(gvproxy: Gvproxy) -> None:
    port = free_port()
    gvproxy.api.expose("udp", LOOPBACK, port, 53)
    with pytest.raises(AlreadyExposed, match=re.escape(f"{LOOPBACK}:{port} already")):
        gvproxy.api.expose("udp", LOOPBACK, port, 53)
    with pytest.raises(NotExposed, match=re.escape(f"tcp {LOOPBACK}:{port}")):
        gvproxy.api.unexpose("tcp", LOOPBACK, port)


def test_stop_leaves_no_process_socket_or_file(binary: str, tmp_path: Path) -> None:
    started = start_gvproxy(network(tmp_path / "vm"), binary)
    port = free_port()
    started.api.expose("tcp", LOOPBACK, port, 80)
    started.stop()
    assert not running(started.pid)  # reaped, not a zombie
    assert list((tmp_path / "vm").iterdir()) == []
    assert not listens(port)
    started.stop()  # idempotent


def test_the_guest_resolves_static_names_and_nothing_else(gvproxy: Gvproxy) -> None:
    with FakeGuestNic(gvproxy.config) as nic:
        assert nic.resolve("web.harpoon.internal") == (0, [IPv4Address("192.168.127.2")])
        assert nic.resolve("host.docker.internal") == (0, [IPv4Address("192.168.127.254")])
        assert nic.resolve("gateway.containers.internal") == (0, [IPv4Address("192.168.127.1")])
        assert nic.resolve("nothing.harpoon.internal") == (NXDOMAIN, [])
        # Off the zones, an A query is answered inside gvproxy too: never forwarded.
        assert nic.resolve("example.com") == (NXDOMAIN, [])


def test_the_guest_reaches_the_hosts_loopback_at_the_nat_address(gvproxy: Gvproxy) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo:
        echo.bind((LOOPBACK, 0))
        echo.settimeout(CONNECT_TIMEOUT_S)
        with FakeGuestNic(gvproxy.config) as nic:
            nic.send_udp(gvproxy.config.host_loopback, echo.getsockname()[1], b"ping", 40001)
            data, sender = echo.recvfrom(64)
            assert (data, sender[0]) == (b"ping", LOOPBACK)
            echo.sendto(b"pong", sender)
            reply = nic.receive(IP_PROTOCOL_UDP)
    assert (reply.source, reply.udp_data) == (gvproxy.config.host_loopback, b"pong")


def test_a_connection_to_a_published_port_reaches_the_guests_port(gvproxy: Gvproxy) -> None:
    port = free_port()
    gvproxy.api.expose("tcp", LOOPBACK, port, 8080)
    with (
        FakeGuestNic(gvproxy.config) as nic,
        socket.create_connection((LOOPBACK, port), CONNECT_TIMEOUT_S),
    ):
        syn = nic.receive(IP_PROTOCOL_TCP)
    assert (syn.destination, syn.ports[1]) == (gvproxy.config.guest, 8080)


def test_it_exits_by_itself_when_its_nic_hangs_up(gvproxy: Gvproxy) -> None:
    # As when its QEMU exits: a gvproxy never outlives its VM's connection.
    with FakeGuestNic(gvproxy.config):
        pass
    gvproxy.process.wait(timeout=CONNECT_TIMEOUT_S)
    gvproxy.stop()
    assert list(gvproxy.config.state_dir.iterdir()) == []


def test_its_files_are_the_owners_alone(gvproxy: Gvproxy) -> None:
    modes = {path.name: path.stat().st_mode & 0o777 for path in gvproxy.config.state_dir.iterdir()}
    assert set(modes) == {path.name for path in gvproxy.config.files()}
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


def test_a_vfkit_nic_gets_the_same_network_through_listen_vfkit(
    binary: str, tmp_path: Path
) -> None:
    """vfkit's NIC (unixgram, `-listen-vfkit`): the same DNS, and a published port's
    connection reaches the guest, as for QEMU's."""
    config = replace(network(tmp_path / "vm"), nic_protocol="vfkit")
    with start_gvproxy(config, binary) as started:
        assert config.net_socket.is_socket()
        port = free_port()
        started.api.expose("tcp", LOOPBACK, port, 8080)
        with FakeGuestNic(config) as nic:
            assert nic.resolve("web.harpoon.internal") == (0, [IPv4Address("192.168.127.2")])
            with socket.create_connection((LOOPBACK, port), CONNECT_TIMEOUT_S):
                syn = nic.receive(IP_PROTOCOL_TCP)
        assert (syn.destination, syn.ports[1]) == (config.guest, 8080)
    assert list(config.state_dir.iterdir()) == []
