"""TCP to and from a container, side by side in one run, for each way a container gets a
network: runc and harpoon on one CNI network (nerdctl), and harpoon through gvproxy.

    python -m bench.net [--mib 256] [--requests 200] [--runs 5 | --quick] [--only WAY…]
    python -m bench.net --table bench/results/net-<stamp>.json   # the table again

Ways (the table's columns), interleaved per round, each round starting one further
along the list so that none always runs after the same one:

- `runc-cni`: `nerdctl run --runtime io.containerd.runc.v2 --net NET -p 127.0.0.1:…`
  on a nerdctl network the bench makes (CNI's bridge, portmap and firewall plugins, on
  a /24 of 10.231.0.0/16 no host address or route uses: harpoon.devenv.cni);
- `harpoon-cni`: the same under this checkout's harpoon (the VM's tap joined to CNI's
  veth by tc, the guest given the veth's MAC and address);
- `harpoon-gvproxy`: `ctr run --net-host`: the host's network, emulated by the VM's
  gvproxy; what the container listens on at a wildcard address is published on the
  host's 127.0.0.1 (the same port), and the host's 127.0.0.1 is 192.168.127.254;
- `harpoon-gvproxy-ports`: plain `ctr run` with the `io.harpoon.network.ports`
  annotation: a namespace of its own on gvproxy's network, its ports published as asked.

Each way's container (busybox) serves three ports: a sink (`nc -ll -e` a script that
`exec`s `dd of=/dev/null bs=64k iflag=fullblock 2>&1`: it reads to EOF and answers
with dd's count of whole blocks, as busybox's dd prints no byte count), a
1-byte echo (`nc -ll -e cat`) and httpd with a 3-byte page. The host measures:

- **host → container**: connect to the sink's port published on 127.0.0.1, send --mib
  MiB, shut the write side, read the answer, which must count every byte; rate = size /
  (connect → answer). For the CNI ways also at the container's own address on the
  bridge, which skips portmap's DNAT.
- **container → host**: the host listens (CNI: at the bridge's gateway; gvproxy: on
  127.0.0.1, which the container reaches at 192.168.127.254), `ctr task exec` runs `nc
  ADDRESS PORT -e /source` in the container, /source `exec`ing `dd if=/dev/zero bs=64k
  count=…`; rate = size / (accept → EOF), every byte counted. busybox nc copies its
  stdin 1 KiB at a time (3 syscalls a KiB), which under TCG would be slower than any
  network here: `-e` hands the socket to dd itself.
- **HTTP request**: --requests times a new connection to httpd's published port,
  `GET /`, the answer read to EOF (httpd forks a child per connection): median, p90.
- **echo round trip**: one connection, then --requests times a byte sent and its echo
  read: the network's round trip alone, no process started per request; median, p90.

Every address the host connects to or listens on is its loopback or in the bench's own
network, and every address a container connects to is the bench's network's gateway or
gvproxy's address for the host's loopback (checked before use): no byte leaves the
machine. `nerdctl --dns 127.0.0.1` keeps name lookups in the container.

harpoon runs through a wrapper shim of this checkout with a guest image and VM templates
of the bench's own (bench/checkout.py; built first: other sessions may rebuild the
machine-wide guest meanwhile). One unmeasured run of each way comes first; a harpoon VM
that booted cold then (no template for its VM yet) has its template built by the shim,
which the bench waits for. The table says how many measured VMs were restored. It also
records the machine's 1-minute load average before and after each way's run.

Leaves nothing, also when ended by ^C or SIGTERM: containers are removed after each
run; at the end the network (its bridge, its firewall rules, host-local's
reservations), the daemon, its shims and VMs and the scratch directory. What was still
there is listed (`leftovers` in the JSON, empty on a clean run). Prints a markdown
table; writes JSON to bench/results/net-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from bench import machine
from bench.checkout import REPO, HarpoonDirs, prepare_harpoon, wrapper_shim
from bench.ctr import RUNC_RUNTIME, Ctr, CtrResult
from bench.report import exit_on_sigterm, print_and_save, say
from bench.shimlog import ShimLog, VMStart
from bench.stats import quantile
from bench.tcp import (
    LOOPBACK,
    MIB,
    Failed,
    accept_and_count,
    echo_round_trips,
    free_port,
    http_get,
    send_then_read,
    within_request_timeout,
)
from harpoon.devenv import cni
from harpoon.devenv.containerd import Containerd
from harpoon.devenv.host import processes_naming
from harpoon.devenv.images import build_busybox_image, default_cache_dir
from harpoon.devenv.nerdctl import OfflineNerdctl
from harpoon.devenv.tools import NERDCTL
from harpoon.net.gvproxy import DEFAULT_HOST_LOOPBACK
from harpoon.sandbox.template import META_NAME
from harpoon.shim import paths
from harpoon.shim.transform.network import PORTS_ANNOTATION


@dataclass(frozen=True)
class Way:
    """How one column's container gets its network."""

    harpoon: bool  # else runc
    network: str  # "cni" (nerdctl --net), "host" (ctr --net-host), "ports" (annotation)


WAYS = {
    "runc-cni": Way(harpoon=False, network="cni"),
    "harpoon-cni": Way(harpoon=True, network="cni"),
    "harpoon-gvproxy": Way(harpoon=True, network="host"),
    "harpoon-gvproxy-ports": Way(harpoon=True, network="ports"),
}
#: The figures, in the table's order: (key, row label, what its samples are).
FIGURES = (
    ("in", "host → container, published port on 127.0.0.1", "rate"),
    ("in-bridge", "host → container, its address on the bridge", "rate"),
    ("out", "container → host", "rate"),
    ("http", "HTTP GET, new connection", "latency"),
    ("echo", "1-byte echo round trip, one connection", "latency"),
)
#: The sizes, and --quick's: 256 MiB keep runc's transfers (~2 GB/s) above 0.1 s, and
#: take ~12 s through gvproxy under TCG; a round of the four ways takes ~1 min here.
DEFAULT_MIB, QUICK_MIB = 256, 16
DEFAULT_REQUESTS, QUICK_REQUESTS = 200, 50
DEFAULT_RUNS, QUICK_RUNS = 5, 1

#: The container's ports where it has a namespace of its own (CNI, the annotation).
HTTP_PORT, SINK_PORT, ECHO_PORT = 80, 5001, 5002
#: dd's block in the container, both ways.
DD_BLOCK_BYTES = 64 << 10
#: Exchanges on a fresh echo connection before the measured ones (gvproxy dials the
#: guest at the first byte).
ECHO_WARMUP = 5
#: `nerdctl run -d` / `ctr run -d` of a VM that may boot cold (TCG, a loaded machine).
START_TIMEOUT_S = 300.0
#: Until every port of a started container answers (gvproxy publishes within ~0.5 s).
READY_TIMEOUT_S = 120.0
#: A transfer: at least this, and this long per MiB on top (0.25 MiB/s).
TRANSFER_TIMEOUT_BASE_S = 60.0
TRANSFER_TIMEOUT_PER_MIB_S = 4.0
#: Removing a container (nerdctl rm -f; ctr task kill, delete).
REMOVE_TIMEOUT_S = 120.0
#: How long a template a cold-booted warm-up VM left to build may take.
TEMPLATE_WAIT_S = 600.0
POLL_INTERVAL_S = 0.2
#: Linux's IP_FREEBIND: listen at the gateway before the bridge has its address.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

SERVER_SCRIPT = r"""
set -e
mkdir -p /www && echo ok > /www/index.html
printf '#!/bin/sh\nexec dd of=/dev/null bs={block} iflag=fullblock 2>&1\n' > /sink
printf '#!/bin/sh\nexec dd if=/dev/zero bs={block} count={blocks} 2>/dev/null\n' > /source
chmod +x /sink /source
nc -ll -p {sink} -e /sink &
nc -ll -p {echo} -e cat &
exec httpd -f -p {http} -h /www
"""


@dataclass(frozen=True)
class Ports:
    http: int
    sink: int
    echo: int


@dataclass(frozen=True)
class Serving:
    """A way's container, started: where the host reaches it and it reaches the host."""

    container_id: str
    name: str  # nerdctl's name, or the ID for ctr
    published: Ports  # on the host's 127.0.0.1
    bridge_address: str | None  # its own address on the bench's network (CNI)
    host_listen: str  # where the host listens for container → host
    host_seen_as: str  # that address as the container connects to it


def server_script(ports: Ports, mib: int) -> str:
    return SERVER_SCRIPT.format(
        block=DD_BLOCK_BYTES, blocks=mib * MIB // DD_BLOCK_BYTES,
        sink=ports.sink, echo=ports.echo, http=ports.http,
    )  # fmt: skip


class NerdctlRunner(Ctr):
    """`nerdctl` against the bench's daemon, run as bench.ctr runs ctr (own session,
    timeout, killed with its process group)."""

    PROGRAM = "nerdctl"

    def __init__(self, nerdctl: OfflineNerdctl) -> None:
        super().__init__(nerdctl.containerd)
        self.nerdctl = nerdctl
        self._env = nerdctl.environment()

    def argv(self, *args: str) -> list[str]:
        return self.nerdctl.command(*args)


async def send_to_sink(address: str, port: int, size: int) -> float:
    """host → container: size bytes into the sink; connect → its count, which must be
    whole blocks and no partial one (iflag=fullblock): every byte arrived."""
    seconds, answer = await send_then_read(address, port, size)
    said = answer.decode(errors="replace")
    if f"{size // DD_BLOCK_BYTES}+0 records in" not in said.splitlines():
        raise Failed(f"the sink counted {said.strip()!r}, not {size} bytes")
    return seconds


def check_local(address: str, network: cni.Network) -> None:
    """address is the host's loopback, in the bench's network, or gvproxy's address for
    the host's loopback: no connection leaves this machine."""
    parsed = ipaddress.ip_address(address)
    if not (parsed.is_loopback or parsed in network.subnet or parsed == DEFAULT_HOST_LOOPBACK):
        raise SystemExit(f"{address} is not on this machine: the bench would send bytes away")


# -- the rounds --------------------------------------------------------------------------


@dataclass
class Measured:
    """Everything one run measured (the JSON's body)."""

    #: Per way, per figure: rates in MiB/s (one per round) or latencies in seconds (all).
    samples: dict[str, dict[str, list[float]]]
    failures: dict[str, list[str]] = field(default_factory=dict)
    #: Per harpoon way, how each measured container's VM started.
    starts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Per way, the machine's 1-minute load average before and after each run.
    load: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: How the warm-up runs' VMs started, and the templates waited for.
    warmup: list[str] = field(default_factory=list)

    def fail(self, way: str, what: str, why: str) -> None:
        self.failures.setdefault(way, []).append(f"{what}: {why}")
        say(f"  {what} failed: {why}")


@dataclass
class NetBench:
    args: argparse.Namespace
    daemon: Containerd
    nerdctl: OfflineNerdctl
    network: cni.Network
    image: str
    harpoon_runtime: str
    templates: Path
    ctr: Ctr = field(init=False)
    nerdctl_runner: NerdctlRunner = field(init=False)
    shim_log: ShimLog = field(init=False)
    #: Every container ID started, for the leftover check.
    started: list[str] = field(default_factory=list)
    #: Every host port published, for the leftover check.
    host_ports: list[int] = field(default_factory=list)
    _execs: int = 0

    def __post_init__(self) -> None:
        self.ctr = Ctr(self.daemon)
        self.nerdctl_runner = NerdctlRunner(self.nerdctl)
        self.shim_log = ShimLog(self.daemon.log_path)

    def runtime(self, way: Way) -> str:
        return self.harpoon_runtime if way.harpoon else RUNC_RUNTIME

    async def measure(self) -> Measured:
        measured = Measured({name: {} for name in self.args.only})
        await self.warm_up(measured)
        for round_ in range(self.args.runs):
            shift = round_ % len(self.args.only)
            for name in self.args.only[shift:] + self.args.only[:shift]:
                load_before, began = os.getloadavg()[0], time.monotonic()
                say(f"round {round_ + 1}/{self.args.runs}: {name} ({time.strftime('%H:%M:%S')})")
                await self.run_way(name, f"net-{name}-{round_}-{os.getpid()}", measured)
                measured.load.setdefault(name, []).append((load_before, os.getloadavg()[0]))
                say(f"  {time.monotonic() - began:.0f} s")
        return measured

    async def warm_up(self, measured: Measured) -> None:
        """One unmeasured run of each way; waits for the template a cold-booted harpoon VM
        left its shim to build, so that measured VMs restore as a user's next would."""
        for name in self.args.only:
            way = WAYS[name]
            known = self.template_keys()
            say(f"warm-up: {name}")
            container_id = f"net-{name}-warmup-{os.getpid()}"
            try:
                serving = await self.start(way, container_id)
                try:
                    await self.wait_serving(serving)
                finally:
                    await self.remove(way, serving.name)
            except (Failed, OSError, TimeoutError) as error:
                measured.warmup.append(f"{name}: failed: {error}")
                say(f"  failed: {error}")
                continue
            if not way.harpoon:
                continue
            start = await self.shim_log.start(serving.container_id)
            said = f"{name}: {_describe(start)}"
            if start.mode == "cold":
                said += "; " + await self.wait_for_template(known)
            measured.warmup.append(said)
            say(f"  {said}")

    def template_keys(self) -> set[str]:
        return {meta.parent.name for meta in self.templates.glob(f"*/{META_NAME}")}

    async def wait_for_template(self, known: set[str]) -> str:
        deadline = time.monotonic() + TEMPLATE_WAIT_S
        while not (new := self.template_keys() - known):
            if time.monotonic() > deadline:
                return f"no template built within {TEMPLATE_WAIT_S:.0f} s"
            await asyncio.sleep(POLL_INTERVAL_S)
        return f"template {', '.join(sorted(new))} built"

    async def run_way(self, name: str, container_id: str, measured: Measured) -> None:
        way, samples = WAYS[name], measured.samples[name]
        try:
            serving = await self.start(way, container_id)
        except (Failed, OSError, TimeoutError) as error:
            measured.fail(name, "start", str(error))
            return
        try:
            if way.harpoon:
                start = await self.shim_log.start(serving.container_id)
                measured.starts.setdefault(name, []).append(
                    {"id": serving.container_id, **asdict(start)}
                )
                say(f"  VM: {_describe(start)}")
            await self.wait_serving(serving)
            for key, run in self.figures(serving):
                try:
                    values = await run()
                except (Failed, OSError, TimeoutError) as error:
                    measured.fail(name, key, f"{type(error).__name__}: {error}")
                    continue
                samples.setdefault(key, []).extend(values)
                say(f"  {key}: {_summary(key, values)}")
        except (Failed, OSError, TimeoutError) as error:
            measured.fail(name, "serving", str(error))
        finally:
            await self.remove(way, serving.name)

    def figures(self, serving: Serving) -> list[tuple[str, Callable[[], Awaitable[list[float]]]]]:
        """Each figure's measurement for this container (values as FIGURES says)."""
        size, count = self.args.mib * MIB, self.args.requests

        async def rate(seconds: Awaitable[float]) -> list[float]:
            return [self.args.mib / await seconds]

        async def requests() -> list[float]:
            return [await within_request_timeout(http_get(published.http)) for _ in range(count)]

        published, bridge_address = serving.published, serving.bridge_address
        runs: list[tuple[str, Callable[[], Awaitable[list[float]]]]] = [
            ("in", lambda: rate(self.transfer(send_to_sink(LOOPBACK, published.sink, size)))),
        ]
        if bridge_address is not None:
            runs.append(
                ("in-bridge",
                 lambda: rate(self.transfer(send_to_sink(bridge_address, SINK_PORT, size)))),
            )  # fmt: skip
        runs += [
            ("out", lambda: rate(self.receive(serving, size))),
            ("http", requests),
            ("echo", lambda: echo_round_trips(published.echo, count, ECHO_WARMUP)),
        ]
        return runs

    async def transfer(self, seconds: Awaitable[float]) -> float:
        async with asyncio.timeout(self._transfer_timeout_s()):
            return await seconds

    def _transfer_timeout_s(self) -> float:
        return TRANSFER_TIMEOUT_BASE_S + TRANSFER_TIMEOUT_PER_MIB_S * float(self.args.mib)

    async def receive(self, serving: Serving, size: int) -> float:
        """container → host: the container's /source connects to a listener of ours;
        accept → EOF, which must come after size bytes."""
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            listener.bind((serving.host_listen, 0))
            listener.listen(1)
            listener.setblocking(False)
            port = listener.getsockname()[1]
            self._execs += 1
            argv = ("nc", serving.host_seen_as, str(port), "-e", "/source")
            sender = asyncio.create_task(self.exec(serving.container_id, *argv))
            try:
                async with asyncio.timeout(self._transfer_timeout_s()):
                    seconds, received = await accept_and_count(listener)
                ran = await sender
            finally:
                if not sender.done():  # the accept or the count failed
                    sender.cancel()
                    await asyncio.wait([sender])
        if not ran.ok:
            raise Failed(ran.failure())
        if received != size:
            raise Failed(f"received {received} bytes, not {size}")
        return seconds

    async def exec(self, container_id: str, *argv: str) -> CtrResult:
        exec_id = f"out-{self._execs}"
        return await self.ctr.run(
            "task", "exec", "--exec-id", exec_id, container_id, *argv,
            timeout_s=self._transfer_timeout_s(),
        )  # fmt: skip

    async def start(self, way: Way, container_id: str) -> Serving:
        """The way's container, started detached, serving (server_script)."""
        if way.network == "cni":
            return await self._start_nerdctl(way, container_id)
        self.started.append(container_id)
        if way.network == "host":
            # The host's network: the container's ports are the host's.
            ports = Ports(free_port(), free_port(), free_port())
            options: tuple[str, ...] = ("--net-host",)
            published = ports
        else:
            ports = Ports(HTTP_PORT, SINK_PORT, ECHO_PORT)
            published = Ports(free_port(), free_port(), free_port())
            mapping = ",".join(
                f"{LOOPBACK}:{host}:{inside}"
                for host, inside in zip(asdict(published).values(), asdict(ports).values(),
                                        strict=True)
            )  # fmt: skip
            options = ("--annotation", f"{PORTS_ANNOTATION}={mapping}")
        self.host_ports += asdict(published).values()
        ran = await self.ctr.run_container(
            self.runtime(way), self.image, container_id, "sh", "-c",
            server_script(ports, self.args.mib),
            timeout_s=START_TIMEOUT_S, detach=True, options=options,
        )  # fmt: skip
        if not ran.ok:
            raise Failed(ran.failure())
        host = str(DEFAULT_HOST_LOOPBACK)
        return Serving(container_id, container_id, published, None, LOOPBACK, host)

    async def _start_nerdctl(self, way: Way, name: str) -> Serving:
        published = Ports(free_port(), free_port(), free_port())
        self.host_ports += asdict(published).values()
        inside = Ports(HTTP_PORT, SINK_PORT, ECHO_PORT)
        publish = [
            flag
            for host, port in zip(asdict(published).values(), asdict(inside).values(), strict=True)
            for flag in ("-p", f"{LOOPBACK}:{host}:{port}")
        ]
        ran = await self.nerdctl_runner.run(
            "run", "-d", "--runtime", self.runtime(way), "--net", self.network.name,
            "--pull", "never", "--name", name, "--dns", LOOPBACK, *publish,
            self.image, "sh", "-c", server_script(inside, self.args.mib),
            timeout_s=START_TIMEOUT_S,
        )  # fmt: skip
        try:
            if not ran.ok:
                raise Failed(ran.failure())
            container_id = ran.stdout.decode().strip().splitlines()[-1]
            self.started.append(container_id)
            address = await self._inspect(name, ".NetworkSettings.IPAddress")
            if ipaddress.ip_address(address) not in self.network.subnet:
                raise Failed(f"nerdctl inspect says {address!r}, not in {self.network.subnet}")
        except BaseException:
            await self.remove(way, name)
            raise
        gateway = str(self.network.gateway)
        return Serving(container_id, name, published, address, gateway, gateway)

    async def _inspect(self, name: str, field_path: str) -> str:
        ran = await self.nerdctl_runner.run(
            "inspect", "--format", f"{{{{{field_path}}}}}", name, timeout_s=REMOVE_TIMEOUT_S
        )
        if not ran.ok:
            raise Failed(ran.failure())
        return ran.stdout.decode().strip()

    async def wait_serving(self, serving: Serving) -> None:
        """Until each of the container's ports answers from the host."""
        for address in (LOOPBACK, serving.host_listen, serving.host_seen_as,
                        *filter(None, [serving.bridge_address])):  # fmt: skip
            check_local(address, self.network)
        probes = (
            lambda: http_get(serving.published.http),
            lambda: echo_round_trips(serving.published.echo, 1, 0),
            lambda: send_to_sink(LOOPBACK, serving.published.sink, 0),
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        for probe in probes:
            while True:
                try:
                    await within_request_timeout(probe())
                    break
                except (Failed, OSError, TimeoutError) as error:
                    if time.monotonic() > deadline:
                        message = f"not serving after {READY_TIMEOUT_S:.0f} s: {error}"
                        raise Failed(message) from error
                    await asyncio.sleep(POLL_INTERVAL_S)

    async def remove(self, way: Way, name: str) -> None:
        if way.network == "cni":
            ran = await self.nerdctl_runner.run("rm", "--force", name, timeout_s=REMOVE_TIMEOUT_S)
            if not ran.ok and "no such container" not in ran.stderr.lower():
                say(f"  {ran.failure()}")
        else:
            await self.ctr.remove_container(name)


def _describe(start: VMStart) -> str:
    said = {"template": "restored", "cold": "cold boot"}.get(start.mode or "", "start unknown")
    if start.seconds is not None:
        said += f" in {start.seconds:.2f} s"
    return said + (f" ({start.cold_reason})" if start.cold_reason else "")


def _summary(key: str, values: list[float]) -> str:
    kind = dict((k, kind) for k, _, kind in FIGURES)[key]
    if kind == "rate":
        return f"{values[0]:.1f} MiB/s"
    return f"median {median(values) * 1e3:.2f} ms, p90 {quantile(values, 0.9) * 1e3:.2f} ms"


# -- set-up, clean-up, report -------------------------------------------------------------


def leftovers(
    bench: NetBench | None, namespace: str, scratch: Path, network: cni.Network | None
) -> list[str]:
    """What the run left on the machine after it cleaned up: harpoon's per-VM state,
    processes naming the scratch directory (shims, QEMU, gvproxy), the bridge, iptables
    rules naming it or a port the bench published."""
    found = [f"process {p.pid}: {' '.join(p.argv)[:200]}" for p in processes_naming(scratch)]
    for container_id in bench.started if bench else []:
        for kind, path in (
            ("VM state", paths.vm_state_dir(namespace, container_id)),
            ("rootfs share", paths.share_dir(namespace, container_id)),
            ("netns", paths.netns_path(namespace, container_id)),
        ):
            if path.exists():
                found.append(f"{kind} {path} ({container_id})")
    if network is not None:
        if Path(f"/sys/class/net/{network.bridge}").exists():
            found.append(f"bridge {network.bridge}")
        needles = [network.bridge, *(f"--dport {p} " for p in (bench.host_ports if bench else []))]
        found += [f"iptables -t {table} {rule}" for table, rule in cni.iptables_rules(*needles)]
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run: build, daemon, network, rounds, clean-up; the record (JSON)."""
    exit_on_sigterm()
    started = time.monotonic()
    began_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if NERDCTL.missing_binaries() and any(WAYS[n].network == "cni" for n in args.only):
        raise SystemExit(f"nerdctl is not built: {NERDCTL.install_hint()}")
    bench: NetBench | None = None
    network: cni.Network | None = None
    left: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hp-net-bench-", dir="/var/tmp") as scratch_dir:
        scratch = Path(scratch_dir)
        say("building the bench's guest image and VM templates")
        dirs: HarpoonDirs = prepare_harpoon(scratch, template=True)
        say(f"  {dirs.built}")
        shims = scratch / "shims"
        shims.mkdir()
        runtime = wrapper_shim(shims, "harpoon", dirs.environment())
        # Debug: containerd copies the shims' log lines (VM starts) into its log.
        with Containerd(args.containerd, path_prepend=[shims], log_level="debug") as daemon:
            nerdctl = OfflineNerdctl(NERDCTL.binary, daemon, scratch / "nerdctl")
            try:
                image = daemon.import_image(build_busybox_image(default_cache_dir()))
                # Unique on the machine (harpoon.devenv.cni says why); a random free /24,
                # so that sessions starting together seldom pick the same one.
                subnet = cni.a_free_subnet()
                network = cni.create(nerdctl, f"hpb-{secrets.token_hex(3)}", subnet)
                say(f"network {network.name}: {subnet}, bridge {network.bridge}")
                bench = NetBench(args, daemon, nerdctl, network, image, runtime, dirs.templates)
                measured = asyncio.run(bench.measure())
            finally:
                left += _clean(nerdctl, network)
        left += leftovers(bench, daemon.namespace, scratch, network)
    record = {
        "args": vars(args),
        "began": began_utc,
        "machine": machine.describe(REPO),
        "built": dirs.built,
        "network": {"subnet": str(network.subnet), "bridge": network.bridge} if network else None,
        **asdict(measured),
        "leftovers": left,
        "seconds": time.monotonic() - started,
    }
    return record


def _clean(nerdctl: OfflineNerdctl, network: cni.Network | None) -> list[str]:
    """Removes nerdctl's containers, then the network; what that found left."""
    left = []
    with contextlib.suppress(RuntimeError, OSError):
        containers = nerdctl.check("ps", "--all", "--quiet", "--no-trunc").split()
        if containers:
            left.append(f"containers {containers}")
            nerdctl.check("rm", "--force", *containers)
    if network is not None:
        try:
            left += cni.remove(nerdctl, network)
        except (RuntimeError, OSError) as error:
            left.append(f"network {network.name}: {error}")
    return left


def table(record: dict[str, Any]) -> str:
    """The markdown table of a run's record (the JSON)."""
    saved, samples = record["args"], record["samples"]
    names = list(samples)
    described = record.get("machine", {})
    lines = [
        f"{record['began']}: {saved['mib']} MiB a transfer, {saved['requests']} requests a run; "
        f"{saved['runs']} round(s): rates are the median of the rounds (min-max), latencies "
        f"the median and p90 of every request; {described.get('nproc')} cores, "
        f"{described.get('accelerator')}; whole run {record['seconds']:.0f} s",
        "",
        "| figure | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, label, kind in FIGURES:
        values = [samples[name].get(key) for name in names]
        if kind == "rate":
            lines.append(f"| {label} | " + " | ".join(_rate_cell(v) for v in values) + " |")
            continue
        for q, said in ((0.5, "median"), (0.9, "p90")):
            cells = [f"{quantile(v, q) * 1e3:.2f} ms" if v else "n/a" for v in values]
            lines.append(f"| {label}, {said} | " + " | ".join(cells) + " |")
    starts: dict[str, list[dict[str, Any]]] = record.get("starts", {})
    restored = [_restored_cell(starts.get(name)) for name in names]
    lines.append("| VMs restored from a template | " + " | ".join(restored) + " |")
    if failures := record.get("failures"):
        counts = "; ".join(f"{name} {len(failed)}" for name, failed in failures.items())
        lines += ["", f"Failed runs (the JSON says why): {counts}"]
    if load := record.get("load"):
        per_way = (
            f"{name} " + ", ".join(f"{before:.1f} → {after:.1f}" for before, after in load[name])
            for name in names
            if name in load
        )
        lines += ["", "Load average (1 min) before → after each run: " + "; ".join(per_way)]
    return "\n".join(lines)


def _rate_cell(values: list[float] | None) -> str:
    if not values:
        return "n/a"
    cell = f"{median(values):.1f} MiB/s"
    if len(values) > 1:
        cell += f" ({min(values):.1f}-{max(values):.1f})"
    return cell


def _restored_cell(starts: list[dict[str, Any]] | None) -> str:
    if starts is None:
        return "-"
    return f"{sum(s['mode'] == 'template' for s in starts)} of {len(starts)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.net", description=__doc__)
    parser.add_argument("--mib", type=int, default=None, help=f"MiB a transfer ({DEFAULT_MIB})")
    parser.add_argument(
        "--requests", type=int, default=None, help=f"HTTP requests and echoes ({DEFAULT_REQUESTS})"
    )
    parser.add_argument("--runs", type=int, default=None, help=f"rounds ({DEFAULT_RUNS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_MIB} MiB, {QUICK_REQUESTS} requests, {QUICK_RUNS} round (unless given)",
    )
    parser.add_argument("--containerd", default="2.3")
    parser.add_argument("--only", nargs="*", default=list(WAYS), choices=list(WAYS), help="ways")
    parser.add_argument("--table", type=Path, help="print the table of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    quick = args.quick
    args.mib = args.mib or (QUICK_MIB if quick else DEFAULT_MIB)
    args.requests = args.requests or (QUICK_REQUESTS if quick else DEFAULT_REQUESTS)
    args.runs = args.runs or (QUICK_RUNS if quick else DEFAULT_RUNS)
    record = run(args)
    print_and_save("net", table(record), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
