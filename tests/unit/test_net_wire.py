"""What harpoon reads of a network namespace CNI configured (harpoon.net.wire), from
`ip -j` output as iproute2 6.1 prints it."""

from __future__ import annotations

from harpoon.net.wire import TAP_NAME, Interface, Route, parse_addresses, parse_routes

ADDRESSES = [
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "mtu": 65536,
     "address": "00:00:00:00:00:00",
     "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifindex": 2, "ifname": TAP_NAME, "flags": ["BROADCAST", "MULTICAST", "UP"], "mtu": 1500,
     "address": "4a:5e:39:2c:18:04", "addr_info": []},
    {"ifindex": 3, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "mtu": 1450, "address": "7e:56:ff:b5:38:d0",
     "addr_info": [
         {"family": "inet", "local": "10.231.8.6", "prefixlen": 24, "scope": "global"},
         {"family": "inet6", "local": "fd00::6", "prefixlen": 64, "scope": "global"},
         {"family": "inet6", "local": "fe80::7c56:ffff:feb5:38d0", "prefixlen": 64,
          "scope": "link"},
     ]},
    {"ifindex": 4, "ifname": "dummy0", "flags": ["BROADCAST", "NOARP"], "mtu": 1500,
     "address": "aa:bb:cc:dd:ee:ff", "addr_info": []},
]  # fmt: skip


def test_the_interfaces_are_cnis_up_ones_with_their_global_addresses() -> None:
    assert parse_addresses(ADDRESSES) == [
        Interface("eth0", "7e:56:ff:b5:38:d0", 1450, ("10.231.8.6/24", "fd00::6/64"))
    ]


def test_routes_leave_out_what_the_addresses_imply_and_link_local_ones() -> None:
    routes = [
        {"dst": "default", "gateway": "10.231.8.1", "dev": "eth0"},
        {"dst": "10.231.8.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link",
         "prefsrc": "10.231.8.6"},
        {"dst": "10.99.0.0/16", "gateway": "10.231.8.254", "dev": "eth0"},
        {"dst": "192.168.5.0/24", "dev": "eth0", "scope": "link"},
        {"dst": "fe80::/64", "dev": "eth0", "metric": 256},
        {"dst": "ff00::/8", "dev": "eth0", "type": "multicast"},
    ]  # fmt: skip
    assert parse_routes(routes) == [
        Route("default", "10.231.8.1", "eth0"),
        Route("10.99.0.0/16", "10.231.8.254", "eth0"),
        Route("192.168.5.0/24", "", "eth0"),
    ]


def test_a_namespace_nothing_configured_has_no_interface() -> None:
    assert parse_addresses(ADDRESSES[:2]) == []
