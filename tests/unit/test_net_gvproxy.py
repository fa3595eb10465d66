"""harpoon.net.gvproxy and gvproxy_api without gvproxy: the network a config describes,
the config file and command line it becomes, the API's requests and how gvproxy's
answers read, and starts that fail (a stand-in script for gvproxy). The real binary's behaviour is
tests/unit/test_net_gvproxy_binary.py's."""

from __future__ import annotations

import json
import os
import re
import stat
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from harpoon.net import gvproxy
from harpoon.net.gvproxy import (
    DnsRecord,
    DnsZone,
    GvproxyConfig,
    command_line,
    config_document,
    log_tail,
    start_gvproxy,
)
from harpoon.net.gvproxy_api import (
    AlreadyExposed,
    ApiError,
    Forward,
    GvproxyError,
    NotExposed,
    PortInUse,
    check_expose,
    check_unexpose,
    expose_request,
    host_endpoint,
    parse_exposed,
    unexpose_request,
)

STATE = Path("/run/harpoon/vm/c1")
GUEST = IPv4Address("192.168.127.2")


def web_forward(port: int = 8080) -> Forward:
    return Forward("tcp", "127.0.0.1", port, GUEST, 80)


def test_the_defaults_are_gvproxys_own_network() -> None:
    config = GvproxyConfig(STATE)
    assert (config.subnet, config.gateway, config.guest, config.host_loopback) == (
        IPv4Network("192.168.127.0/24"),
        IPv4Address("192.168.127.1"),
        GUEST,
        IPv4Address("192.168.127.254"),
    )
    assert config.mtu == 1500 and config.guest_mac == "5a:94:ef:e4:0c:ee"


def test_the_host_loopback_address_is_natted_to_127_0_0_1_and_answered_by_the_gateway() -> None:
    stack = config_document(GvproxyConfig(STATE, host_loopback=IPv4Address("192.168.127.253")))
    assert stack["stack"]["nat"] == {"192.168.127.253": "127.0.0.1"}
    assert stack["stack"]["gatewayVirtualIPs"] == ["192.168.127.253"]
    assert stack["stack"]["dhcpStaticLeases"] == {"192.168.127.2": "5a:94:ef:e4:0c:ee"}
    json.dumps(stack)  # the file is JSON, which gvproxy's YAML reader takes


def test_the_host_and_gateway_have_their_docker_and_podman_names() -> None:
    zones = {zone.name: zone for zone in GvproxyConfig(STATE).zones()}
    for name in ("docker.internal.", "containers.internal."):
        assert DnsRecord("host", IPv4Address("192.168.127.254")) in zones[name].records
        assert DnsRecord("gateway", IPv4Address("192.168.127.1")) in zones[name].records
    assert "" not in zones  # other names: the host's resolver


def test_without_upstream_dns_a_last_zone_takes_every_other_name() -> None:
    zones = GvproxyConfig(STATE, resolve_upstream=False).zones()
    assert zones[-1] == DnsZone("")
    assert config_document(GvproxyConfig(STATE, resolve_upstream=False))["stack"]["dns"][-1] == {
        "name": "",
        "records": [],
    }


def test_configured_records_come_first_and_specific_zones_before_wider_ones() -> None:
    mine = IPv4Address("192.168.127.10")
    config = GvproxyConfig(
        STATE,
        dns_zones=(
            DnsZone("internal.", (DnsRecord("db", mine),)),
            DnsZone("Docker.Internal.", (DnsRecord("host", mine),)),
            DnsZone("app.docker.internal.", (DnsRecord("web", mine),)),
        ),
    )
    zones = config.zones()
    # gvproxy answers from the first zone that is a suffix of the name.
    assert [zone.name for zone in zones] == [
        "app.docker.internal.",
        "containers.internal.",
        "docker.internal.",
        "internal.",
    ]
    docker = zones[2].records
    assert docker[0] == DnsRecord("host", mine)  # the first record of a name wins


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"guest": IPv4Address("10.0.0.2")}, "guest 10.0.0.2 is not a host address"),
        ({"gateway": IPv4Address("192.168.127.255")}, "gateway 192.168.127.255 is not a host"),
        ({"host_loopback": GUEST}, "must differ"),
        ({"guest_mac": "5A-94-EF-E4-0C-EE"}, "guest_mac .* is not a MAC address"),
        ({"mtu": 100}, "mtu 100 is outside"),
        ({"dns_zones": (DnsZone("docker.internal"),)}, "trailing dot"),
        ({"dns_zones": (DnsZone("x.", (DnsRecord("a b", GUEST),)),)}, "'a b' .* is not a name"),
        ({"state_dir": Path("/run/" + "d" * 100)}, "longer than a unix socket path"),
    ],
)
def test_a_config_gvproxy_would_misread_is_refused(
    change: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        GvproxyConfig(**{"state_dir": STATE, **change})  # type: ignore[arg-type]


def test_the_command_line_serves_the_api_without_connect_and_listens_for_qemu() -> None:
    config = GvproxyConfig(STATE)
    argv = command_line("/bin/gvproxy", config)
    assert argv[argv.index("-services") + 1] == f"unix://{STATE}/gvproxy-api.sock"
    assert argv[argv.index("-listen-qemu") + 1] == f"unix://{STATE}/gvproxy-net.sock"
    assert argv[argv.index("-config") + 1] == str(config.config_file)
    assert argv[argv.index("-pid-file") + 1] == str(config.pid_file)
    # -listen would add /connect (another VM on this switch); -ssh-port is ignored
    # beside a config file, which sets no forward of its own.
    assert "-listen" not in argv and "-ssh-port" not in argv
    assert set(config.files()) >= {config.net_socket, config.api_socket, config.log_file}


def test_for_a_vfkit_nic_it_listens_on_a_unixgram_socket_instead() -> None:
    argv = command_line("/bin/gvproxy", GvproxyConfig(STATE, nic_protocol="vfkit"))
    assert argv[argv.index("-listen-vfkit") + 1] == f"unixgram://{STATE}/gvproxy-net.sock"
    assert "-listen-qemu" not in argv
    with pytest.raises(ValueError, match="gvproxy nic_protocol 'tap': use one of qemu, vfkit"):
        GvproxyConfig(STATE, nic_protocol="tap")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "port", "local"),
    [("127.0.0.1", 8080, "127.0.0.1:8080"), ("::1", 53, "[::1]:53"), ("", 80, ":80")],
)
def test_the_host_end_is_named_as_gvproxy_listens(address: str, port: int, local: str) -> None:
    assert host_endpoint(address, port) == local


def test_an_expose_request_names_the_host_end_and_the_guests_port() -> None:
    request = expose_request(web_forward())
    assert (request.method, request.path) == ("POST", "/services/forwarder/expose")
    assert json.loads(request.body or b"") == {
        "local": "127.0.0.1:8080",
        "remote": "192.168.127.2:80",
        "protocol": "tcp",
    }
    unexpose = unexpose_request("udp", "127.0.0.1", 5353)
    assert json.loads(unexpose.body or b"") == {"local": "127.0.0.1:5353", "protocol": "udp"}


@pytest.mark.parametrize(
    "bad",
    [
        Forward("sctp", "127.0.0.1", 80, GUEST, 80),
        Forward("tcp", "localhost", 80, GUEST, 80),
        Forward("tcp", "127.0.0.1", 0, GUEST, 80),
        Forward("tcp", "127.0.0.1", 80, GUEST, 65536),
    ],
)
def test_a_forward_gvproxy_cannot_make_is_refused_before_asking(bad: Forward) -> None:
    with pytest.raises(ValueError):
        expose_request(bad)


def test_gvproxys_refusals_become_errors_that_name_the_port() -> None:
    in_use = b"listen tcp 127.0.0.1:8080: bind: address already in use\n"
    with pytest.raises(PortInUse, match="host port 8080 is in use") as raised:
        check_expose(web_forward(), 500, in_use)
    assert raised.value.status == 500
    with pytest.raises(AlreadyExposed, match=re.escape("127.0.0.1:8080 already")):
        check_expose(web_forward(), 500, b"proxy already running\n")
    with pytest.raises(
        ApiError, match=re.escape("8080 -> 192.168.127.2:80: gvproxy answered 500: boom")
    ):
        check_expose(web_forward(), 500, b"boom\n")
    with pytest.raises(
        NotExposed, match=re.escape("tcp 127.0.0.1:8080: this VM does not publish it")
    ):
        check_unexpose("tcp", "127.0.0.1", 8080, 500, b"proxy not found\n")
    check_expose(web_forward(), 200, b"")
    check_unexpose("tcp", "127.0.0.1", 8080, 200, b"")


def test_the_published_ports_are_read_from_gvproxys_list() -> None:
    body = json.dumps(
        [
            {"local": "127.0.0.1:8080", "remote": "192.168.127.2:80", "protocol": "tcp"},
            {"local": "[::1]:5353", "remote": "192.168.127.2:53", "protocol": "udp"},
            {"local": ":9000", "remote": "192.168.127.2:9000", "protocol": "tcp"},
            {"local": "/tmp/x.sock", "remote": "tcp://192.168.127.2:2375", "protocol": "unix"},
        ]
    ).encode()
    assert parse_exposed(200, body) == [
        web_forward(),
        Forward("udp", "::1", 5353, GUEST, 53),
        Forward("tcp", "", 9000, GUEST, 9000),
    ]
    with pytest.raises(ApiError, match="gvproxy's answer"):
        parse_exposed(200, b"{not json")
    with pytest.raises(ApiError, match="answered 404"):
        parse_exposed(404, b"404 page not found\n")


def test_the_log_tail_is_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "gvproxy.log"
    log.write_text("".join(f"line {n}\n" for n in range(1000)))
    tail = log_tail(log, limit_bytes=40)
    assert tail.splitlines()[-1] == "line 999"
    assert all(line.startswith("line ") for line in tail.splitlines())
    assert log_tail(tmp_path / "missing") == ""


def stand_in(tmp_path: Path, script: str) -> str:
    path = tmp_path / "gvproxy"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_a_gvproxy_that_exits_as_it_starts_is_reported_with_its_log(tmp_path: Path) -> None:
    binary = stand_in(tmp_path, 'echo "level=fatal msg=\\"cannot listen\\"" >&2; exit 1')
    config = GvproxyConfig(tmp_path / "vm")
    with pytest.raises(GvproxyError, match=r"exited with status 1[\s\S]*cannot listen"):
        start_gvproxy(config, binary)
    assert list(config.state_dir.iterdir()) == []


def test_a_gvproxy_that_never_answers_is_killed_after_the_start_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gvproxy, "START_TIMEOUT_S", 0.3)
    pid_file = tmp_path / "stand-in.pid"
    binary = stand_in(tmp_path, f"echo $$ > {pid_file}; echo waiting >&2; exec sleep 60")
    config = GvproxyConfig(tmp_path / "vm")
    with pytest.raises(GvproxyError, match=r"did not answer[\s\S]*waiting"):
        start_gvproxy(config, binary)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped
    assert list(config.state_dir.iterdir()) == []


def test_stale_sockets_of_a_killed_gvproxy_are_removed_before_a_start(tmp_path: Path) -> None:
    # gvproxy refuses to listen where its socket is: the start clears the way.
    config = GvproxyConfig(tmp_path / "vm")
    config.state_dir.mkdir()
    config.net_socket.write_bytes(b"")
    seen = tmp_path / "seen"
    binary = stand_in(tmp_path, f"ls {config.state_dir} > {seen}; exit 3")
    with pytest.raises(GvproxyError, match="status 3"):
        start_gvproxy(config, binary)
    assert "gvproxy-net.sock" not in seen.read_text()
    assert stat.S_IMODE(config.state_dir.stat().st_mode) == 0o700


def test_the_binary_named_in_the_environment_is_the_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = stand_in(tmp_path, "exit 0")
    monkeypatch.setenv(gvproxy.BINARY_ENV, binary)
    assert gvproxy.find() == binary
    monkeypatch.setenv(gvproxy.BINARY_ENV, str(tmp_path / "missing"))
    assert gvproxy.find() is None
    with pytest.raises(GvproxyError, match=f"gvproxy not found .*{gvproxy.BINARY_ENV}"):
        start_gvproxy(GvproxyConfig(tmp_path / "vm"))
