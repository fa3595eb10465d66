"""gvproxy (containers/gvisor-tap-vsock v0.8.9): one VM's user-mode network on the host.

A VM whose containers share the host's network gets a virtio-net NIC whose frames go
over a unix stream socket (QEMU `-netdev stream,server=off`, 4-byte big-endian length
before each frame) to a gvproxy of its own. gvproxy is a userspace TCP/IP stack
(gVisor's netstack): what the guest sends to any address it sends from the host, as a
host process; the guest reaches the host's own 127.0.0.1 at a virtual address
(`host_loopback`, NAT in gvproxy); the gateway serves DHCP and DNS; ports are
published by asking gvproxy's HTTP API to listen on the host and forward to the guest
(harpoon.net.gvproxy_api; `Gvproxy.api` is a client of this VM's).

Facts this module relies on (v0.8.9's source, cmd/gvproxy and pkg/, and trying it):

- One VM per gvproxy: `-listen-qemu` accepts one connection, and gvproxy exits when
  that peer hangs up (so it goes with its QEMU). `-listen-vfkit unixgram://PATH` (a
  vfkit VM's NIC: `virtio-net,unixSocketPath=PATH`) binds a datagram socket and takes
  the first peer that sends vfkit's 4-byte magic "VFKT", then one Ethernet frame per
  datagram; a datagram peer never hangs up, so that gvproxy runs until it is killed
  (with its VM: harpoon.vmm). It refuses to start when the socket
  path exists. On SIGTERM it removes its sockets and pid file; SIGKILL leaves them.
- No flag sets the subnet or DNS: they come from `-config FILE`, YAML, which JSON is
  a subset of (so this module writes JSON). With a config file gvproxy sets up no
  DNS zones, DHCP leases or port forwards of its own (without one it adds the zones
  `containers.internal.` and `docker.internal.`, a lease of 192.168.127.2 to
  5a:94:ef:e4:0c:ee and a forward of 127.0.0.1:2222 to the guest's ssh, which
  `-ssh-port -1` drops; `-ssh-port` is ignored, with a warning, beside a config).
- Its API is served on `-listen` (with `/connect`, which attaches another VM to the
  same switch) or `-services` (the same without `/connect`): harpoon uses the latter.
  The guest also reaches `/services/forwarder/{all,expose,unexpose}` at the gateway's
  port 80, and no flag turns that off: a process in the VM can publish host ports,
  remove harpoon's, or (protocol "unix") make gvproxy delete a host file and bind a
  socket in its place, with gvproxy's privileges.
- DNS at the gateway: an A query for a name under a zone of the config is answered
  from its records (no match: NXDOMAIN), other names go to the host's resolver (Go's,
  reading the host's /etc/resolv.conf). A zone named "" takes every name, so no A
  query leaves gvproxy (`resolve_upstream=False`). Upstream forwarding cannot be
  turned off wholly: CNAME, MX, NS, SRV and TXT queries are always resolved through
  the host's resolver, whatever the zones (AAAA and other types get an empty answer).

Starting waits for gvproxy to answer on its API socket and to listen for QEMU (it
offers no readiness signal to wait on: both are polled, for at most START_TIMEOUT_S),
so QEMU, which connects once as it starts, can be launched as soon as `start_gvproxy`
returns. `start_gvproxy` and `Gvproxy.stop` need no event loop: a shim launches its VM
(and so this) before it loads asyncio. Nothing here may leave a process, socket or
file behind after `stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

from harpoon import linux, private
from harpoon.net.gvproxy_api import GvproxyApi, GvproxyError

VERSION = "0.8.9"
#: Names the gvproxy binary to run, overriding the search (`find`).
BINARY_ENV = "HARPOON_GVPROXY"
#: Where podman's packages put it (Debian/Fedora, Homebrew's podman, podman's installer).
SYSTEM_BINARIES = (
    Path("/usr/libexec/podman/gvproxy"),
    Path("/usr/lib/podman/gvproxy"),
    Path("/opt/homebrew/opt/podman/libexec/podman/gvproxy"),
    Path("/opt/podman/bin/gvproxy"),
)

#: gvproxy creates its listeners within ~50 ms (measured); this is for a loaded host.
START_TIMEOUT_S = 10.0
READY_POLL_S = 0.01
#: After SIGKILL only the kernel is left to act: this catches a process stuck in D state.
STOP_TIMEOUT_S = 5.0
#: How much of gvproxy's log an error quotes.
LOG_TAIL_BYTES = 2048
#: sun_path holds 104 bytes on macOS, 108 on Linux, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 103

#: gvproxy's own defaults (cmd/gvproxy/config.go), kept so that a guest configured for
#: podman's machines finds the same network.
DEFAULT_SUBNET = IPv4Network("192.168.127.0/24")
DEFAULT_GATEWAY = IPv4Address("192.168.127.1")
DEFAULT_GUEST = IPv4Address("192.168.127.2")
DEFAULT_HOST_LOOPBACK = IPv4Address("192.168.127.254")
DEFAULT_GATEWAY_MAC = "5a:94:ef:e4:0c:dd"
DEFAULT_GUEST_MAC = "5a:94:ef:e4:0c:ee"
DEFAULT_MTU = 1500
#: The zones gvproxy serves without a config file, each with the names `gateway` and
#: `host` (host_loopback): podman's and Docker Desktop's names for the host.
DEFAULT_ZONE_NAMES = ("containers.internal.", "docker.internal.")

NicProtocol = Literal["qemu", "vfkit"]
NIC_PROTOCOLS: tuple[NicProtocol, ...] = ("qemu", "vfkit")

# Lower case only: gvproxy looks DHCP leases up by Go's (lower-case) spelling of the
# client's MAC, so "5A:94:…" would silently get no lease.
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?", re.IGNORECASE)


@dataclass(frozen=True)
class DnsRecord:
    """A name in a zone (`host`, or `web.app`: without the zone) and its A record."""

    name: str
    address: IPv4Address


@dataclass(frozen=True)
class DnsZone:
    """Names gvproxy answers itself: `name` is the zone, fully qualified with its
    trailing dot ("docker.internal."). A name under it that no record has is NXDOMAIN."""

    name: str
    records: tuple[DnsRecord, ...] = ()


@dataclass(frozen=True)
class GvproxyConfig:
    """One VM's network: addresses, MTU and DNS, and where its gvproxy keeps its files
    (`state_dir`, the VM's: the files are named gvproxy*, so they can share it)."""

    state_dir: Path
    subnet: IPv4Network = DEFAULT_SUBNET
    gateway: IPv4Address = DEFAULT_GATEWAY
    #: The address DHCP gives the NIC with `guest_mac` (or the guest sets statically).
    guest: IPv4Address = DEFAULT_GUEST
    guest_mac: str = DEFAULT_GUEST_MAC
    gateway_mac: str = DEFAULT_GATEWAY_MAC
    #: Where the guest reaches the host's 127.0.0.1 (TCP and UDP, any port).
    host_loopback: IPv4Address = DEFAULT_HOST_LOOPBACK
    mtu: int = DEFAULT_MTU
    #: Zones besides the default ones (records of a zone named twice are merged).
    dns_zones: tuple[DnsZone, ...] = ()
    dns_search_domains: tuple[str, ...] = ()
    #: False: an A query outside the zones is NXDOMAIN instead of the host resolver's
    #: answer (tests; see the module's docstring for the query types it cannot stop).
    resolve_upstream: bool = True
    #: How the VM's NIC reaches `net_socket`: "qemu" (QEMU's `-netdev stream`: a unix
    #: stream socket, `-listen-qemu`) or "vfkit" (vfkit's `virtio-net,unixSocketPath`:
    #: a unixgram socket, `-listen-vfkit`).
    nic_protocol: NicProtocol = "qemu"

    def __post_init__(self) -> None:
        _check_addresses(self)
        _check_link(self)
        if self.nic_protocol not in NIC_PROTOCOLS:
            raise ValueError(
                f"gvproxy nic_protocol {self.nic_protocol!r}: use one of {', '.join(NIC_PROTOCOLS)}"
            )
        for path in (self.net_socket, self.api_socket):
            if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
                raise ValueError(
                    f"gvproxy socket {path} is longer than a unix socket path may be "
                    f"({MAX_SOCKET_PATH_BYTES} bytes): use a shorter state directory"
                )
        for zone in self.dns_zones:
            _check_zone(zone)

    @property
    def net_socket(self) -> Path:
        """Where gvproxy listens for the VM's NIC (QEMU's `-netdev stream` connects;
        vfkit sends its datagrams)."""
        return self.state_dir / "gvproxy-net.sock"

    @property
    def api_socket(self) -> Path:
        """gvproxy's HTTP API (`-services`)."""
        return self.state_dir / "gvproxy-api.sock"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "gvproxy.json"

    @property
    def pid_file(self) -> Path:
        """Written by gvproxy itself: a `delete` after a killed shim finds it here."""
        return self.state_dir / "gvproxy.pid"

    @property
    def log_file(self) -> Path:
        """gvproxy's stderr and stdout (its logrus log and any Go panic)."""
        return self.state_dir / "gvproxy.log"

    def files(self) -> tuple[Path, ...]:
        """Everything a gvproxy of this config may leave in the state directory."""
        return (self.net_socket, self.api_socket, self.config_file, self.pid_file, self.log_file)

    def zones(self) -> tuple[DnsZone, ...]:
        """The zones gvproxy serves: the default ones (`gateway`, `host`), then those
        configured, same-named zones merged; most specific first (gvproxy answers from
        the first zone that is a suffix of the name), and last, when upstream
        resolution is off, the zone "" that takes every other name."""
        # gvproxy answers from a zone's first record of the name: configured ones win.
        records: dict[str, list[DnsRecord]] = {}
        for zone in self.dns_zones:
            records.setdefault(zone.name.lower(), []).extend(zone.records)
        defaults = [DnsRecord("gateway", self.gateway), DnsRecord("host", self.host_loopback)]
        for zone_name in DEFAULT_ZONE_NAMES:
            records.setdefault(zone_name, []).extend(defaults)
        ordered = sorted(records, key=lambda name: (-name.count("."), name))
        zones = [DnsZone(name, tuple(records[name])) for name in ordered]
        if not self.resolve_upstream:
            zones.append(DnsZone(""))
        return tuple(zones)


def _check_addresses(config: GvproxyConfig) -> None:
    usable = {config.subnet.network_address, config.subnet.broadcast_address}
    named = {
        "gateway": config.gateway,
        "guest": config.guest,
        "host_loopback": config.host_loopback,
    }
    for name, address in named.items():
        if address not in config.subnet or address in usable:
            raise ValueError(f"gvproxy {name} {address} is not a host address of {config.subnet}")
    if len(set(named.values())) != len(named):
        raise ValueError(f"gvproxy's gateway, guest and host_loopback must differ: {named}")


def _check_link(config: GvproxyConfig) -> None:
    for name, mac in (("guest_mac", config.guest_mac), ("gateway_mac", config.gateway_mac)):
        if not _MAC.fullmatch(mac):
            raise ValueError(f"gvproxy {name} {mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    # From the datagram size every IPv4 host must take (RFC 791) to virtio-net's largest.
    if not 576 <= config.mtu <= 65535:
        raise ValueError(f"gvproxy mtu {config.mtu} is outside 576..65535")


def _check_zone(zone: DnsZone) -> None:
    labels = zone.name.split(".")
    if not zone.name.endswith(".") or not all(_LABEL.fullmatch(x) for x in labels[:-1]):
        raise ValueError(
            f"DNS zone {zone.name!r}: give a fully qualified name with its trailing dot, "
            "e.g. 'docker.internal.'"
        )
    for record in zone.records:
        if not all(_LABEL.fullmatch(label) for label in record.name.split(".")):
            raise ValueError(f"DNS record {record.name!r} in zone {zone.name!r} is not a name")


def config_document(config: GvproxyConfig) -> dict[str, Any]:
    """gvproxy's `-config` file for config (pure): the network only; sockets, pid
    file and log are on its command line."""
    return {
        "log-level": "info",
        "stack": {
            "mtu": config.mtu,
            "subnet": str(config.subnet),
            "gatewayIP": str(config.gateway),
            "gatewayMacAddress": config.gateway_mac,
            "dns": [
                {
                    "name": zone.name,
                    "records": [{"name": r.name, "ip": str(r.address)} for r in zone.records],
                }
                for zone in config.zones()
            ],
            "dnsSearchDomains": list(config.dns_search_domains),
            "nat": {str(config.host_loopback): "127.0.0.1"},
            # The gateway answers ARP for the NAT address too, or the guest finds no one.
            "gatewayVirtualIPs": [str(config.host_loopback)],
            "dhcpStaticLeases": {str(config.guest): config.guest_mac},
        },
    }


def command_line(binary: str, config: GvproxyConfig) -> list[str]:
    """gvproxy's argv for config (pure). Its log goes to stderr, not `-log-file`:
    errors in its flags and config file are written before that file is opened."""
    return [
        binary,
        "-config", str(config.config_file),
        *_nic_listener(config),
        "-services", f"unix://{config.api_socket}",
        "-pid-file", str(config.pid_file),
    ]  # fmt: skip


def _nic_listener(config: GvproxyConfig) -> tuple[str, str]:
    if config.nic_protocol == "vfkit":
        return ("-listen-vfkit", f"unixgram://{config.net_socket}")
    return ("-listen-qemu", f"unix://{config.net_socket}")


def find() -> str | None:
    """The gvproxy to run: $HARPOON_GVPROXY, the one scripts/install-deps built, PATH's,
    podman's; None when there is none."""
    named = os.environ.get(BINARY_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    for candidate in (_tools_binary(), shutil.which("gvproxy"), *SYSTEM_BINARIES):
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _tools_binary() -> Path:
    # Its directory is named by a hash of its tarball and recipe, which only the build
    # knows; imported here, not at the top: only a start without $HARPOON_GVPROXY pays.
    from harpoon.devenv.tools import GVPROXY

    return GVPROXY.binary


@dataclass
class Gvproxy:
    """A running gvproxy: `stop` it (or leave a `with` block) to end it and remove its
    files. It also exits by itself once its VM's NIC hangs up (a QEMU NIC's: a vfkit
    NIC's datagrams never do)."""

    config: GvproxyConfig
    process: subprocess.Popen[bytes]
    api: GvproxyApi = field(init=False)

    def __post_init__(self) -> None:
        self.api = GvproxyApi(self.config.api_socket, self.config.guest)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        return log_tail(self.config.log_file)

    def stop(self) -> None:
        """Kills gvproxy (nothing of its state is worth a graceful exit), reaps it and
        removes its sockets and files; idempotent."""
        # Popen signals only a process it has not reaped: a recycled pid is never hit.
        self.process.kill()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise GvproxyError(
                f"gvproxy {self.pid} did not exit {STOP_TIMEOUT_S:.0f} s after SIGKILL"
            ) from None
        finally:
            remove_files(self.config)

    def __enter__(self) -> Gvproxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_gvproxy(config: GvproxyConfig, binary: str | None = None) -> Gvproxy:
    """A gvproxy for one VM, answering on its API socket and listening for the VM's
    NIC. It runs in a session of its own (a signal to the shim's process group is
    not one to it), with no stdin and its log in the state directory, and gets
    SIGKILL if the thread that started it dies (Linux): start it from the thread that
    outlives it, as QEMU is. Raises GvproxyError, naming its log's last lines, if it
    exits or does not answer within START_TIMEOUT_S."""
    binary = binary or find()
    if binary is None:
        raise GvproxyError(
            f"gvproxy not found (scripts/install-deps builds v{VERSION}; or set {BINARY_ENV})"
        )
    private.directory(config.state_dir)
    # What a killed gvproxy left: it refuses to listen where its socket already is.
    remove_files(config)
    private.write_file(config.config_file, json.dumps(config_document(config), indent=1).encode())
    try:
        with open(private.open_file(config.log_file, os.O_WRONLY | os.O_TRUNC), "wb") as log:
            process = subprocess.Popen(
                command_line(binary, config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_child_setup,
            )
    except BaseException:
        remove_files(config)
        raise
    gvproxy = Gvproxy(config, process)
    try:
        _wait_ready(gvproxy)
    except GvproxyError as error:
        tail = gvproxy.log_tail() or "(empty)"  # read before stop removes the log
        gvproxy.stop()
        raise GvproxyError(f"{error}; its log ends:\n{tail}") from None
    except BaseException:
        gvproxy.stop()
        raise
    return gvproxy


def _child_setup() -> None:
    # Runs in the forked child before exec: no imports here (another thread may hold an
    # import's lock). The sockets and pid file gvproxy makes are root's alone.
    os.setsid()
    os.umask(private.UMASK)
    if sys.platform == "linux":
        # Without it a gvproxy whose QEMU never connected would outlive a killed shim.
        linux.set_parent_death_signal(signal.SIGKILL)


def _wait_ready(gvproxy: Gvproxy) -> None:
    """Returns once gvproxy answers on its API and listens for the NIC. gvproxy makes
    the API's listener first; there is nothing to wait on but the two themselves."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = gvproxy.process.poll()
        if status is not None:
            raise GvproxyError(f"gvproxy exited with status {status} as it started")
        if gvproxy.config.net_socket.is_socket() and _answers(gvproxy.api):
            return
        if time.monotonic() > deadline:
            raise GvproxyError(
                f"gvproxy {gvproxy.pid} did not answer on {gvproxy.config.api_socket} and "
                f"listen on {gvproxy.config.net_socket} within {START_TIMEOUT_S:.0f} s"
            )
        time.sleep(READY_POLL_S)


def _answers(api: GvproxyApi) -> bool:
    try:
        api.exposed()
    except GvproxyError:
        return False
    return True


def remove_files(config: GvproxyConfig) -> None:
    """Removes every file a gvproxy of config makes or leaves (see GvproxyConfig.files)."""
    for path in config.files():
        path.unlink(missing_ok=True)


def log_tail(path: Path, limit_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last whole lines of a log, at most limit_bytes of them; "" if there is none."""
    with contextlib.suppress(OSError), open(path, "rb") as log:
        log.seek(0, os.SEEK_END)
        size = log.tell()
        log.seek(max(0, size - limit_bytes))
        data = log.read()
        if size > limit_bytes:
            data = data.partition(b"\n")[2]
        return data.decode(errors="replace").rstrip()
    return ""
