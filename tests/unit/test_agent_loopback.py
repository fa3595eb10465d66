"""The guest's NAT of the host's loopback (harpoon.agent.loopback): the rules it hands
iptables-restore, checked by the host's own iptables-restore where it can."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from harpoon.agent import loopback

HOST = "192.168.127.254"


def test_the_table_sends_only_the_hosts_ports_to_the_host() -> None:
    rules = loopback.base_rules("eth0", {("tcp", 8080), ("udp", 53)}, HOST).splitlines()
    assert rules == [
        "*nat",
        f":{loopback.CHAIN} - [0:0]",
        f"-A OUTPUT -d 127.0.0.1/32 -p tcp -j {loopback.CHAIN}",
        f"-A OUTPUT -d 127.0.0.1/32 -p udp -j {loopback.CHAIN}",
        "-A POSTROUTING -s 127.0.0.1/32 -o eth0 -j MASQUERADE",
        f"-A {loopback.CHAIN} -p tcp --dport 8080 -j DNAT --to-destination {HOST}",
        f"-A {loopback.CHAIN} -p udp --dport 53 -j DNAT --to-destination {HOST}",
        "COMMIT",
    ]
    chain = loopback.chain_rules(set(), HOST).splitlines()
    assert chain == ["*nat", f"-F {loopback.CHAIN}", "COMMIT"]


@pytest.mark.skipif(shutil.which("iptables-legacy-restore") is None, reason="no iptables-legacy")
def test_iptables_restore_parses_the_rules() -> None:
    rules = loopback.base_rules("eth0", {("tcp", 8080), ("udp", 53)}, HOST)
    done = subprocess.run(
        ["iptables-legacy-restore", "--test"], input=rules.encode(), capture_output=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
