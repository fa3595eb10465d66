"""Which network a container's VM gets, from config.json (the rule the README states):

- **A network namespace** in `linux.namespaces` → the VM runs in it, with a virtio-net
  NIC on a tap there (harpoon.net.wire). A namespace given by `path` (a CRI pod's,
  `nerdctl --net ns:…`) is used as it is; one without a path is harpoon's own, made
  before the VM launches and removed with it (harpoon.net.netns). Either way the pid
  harpoon reports for the task (the VMM's) lives in it, so `/proc/<pid>/ns/net` is
  the container's namespace, as nerdctl's `createRuntime` hook and CNI expect. Once
  the hooks ran (harpoon.shim.transform.oci_hooks), what they configured there — a veth,
  its addresses, routes — is joined to the tap and given to the guest: the NIC moves
  into the container's own namespace in the guest, with the veth's MAC, addresses,
  MTU and routes. A namespace nothing configured leaves the container its loopback
  alone, as under runc.
- **No network namespace** (the host's network: `nerdctl --net host`, BuildKit,
  shimtest) → user-mode networking: the NIC's frames go to a gvproxy of the VM's own
  (harpoon.net.gvproxy, started with the VMM), which sends what the guest sends from
  the host, as a host process would; the guest's own namespace (the container's) gets
  gvproxy's address, and every TCP or UDP port something listens on there at a
  wildcard address is published on the host's 127.0.0.1 (Sandbox.forward_listeners),
  and a connection to 127.0.0.1 on a port the host listens on and the guest does not
  reaches the host's 127.0.0.1 (harpoon.agent.loopback).
- **A namespace of its own on the user-mode network** (`user_network_ports`): the
  annotation PORTS_ANNOTATION publishes ports of it through its gvproxy; and on a host
  without network namespaces (macOS: no tap for the VM) every namespace harpoon is to
  make is made so, in the guest alone, publishing nothing.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon import linux
from harpoon.errdefs import FailedPrecondition, InvalidArgument
from harpoon.net import gvproxy, wire
from harpoon.net.ports import PublishedPort
from harpoon.shim import hooks, paths
from harpoon.shim.transform import oci_hooks
from harpoon.shim.transform.draft import CreateContext, Draft, Transformer
from harpoon.vmm.devices import NIC, StreamBackend, TapBackend

if TYPE_CHECKING:
    from harpoon.sandbox.sandbox import Sandbox

NIC_ID = "eth0"
#: The MAC every VM's NIC starts with, its template's too (a restored guest keeps it),
#: by which the agent finds the NIC; the agent gives it the container's own (CNI's
#: veth's, or gvproxy's guest's) before it carries a frame.
NIC_MAC = "02:00:00:00:00:00"
#: gvproxy serves its forwarding API at its gateway's port 80 too (no flag turns that
#: off), and that API, run by root, binds any host port and replaces any host file with
#: a socket: the guest's side of its network drops connections to it.
GVPROXY_API = f"{gvproxy.DEFAULT_GATEWAY}:80"
#: Publishes ports of a container with a network namespace of its own through harpoon's
#: user-mode network (gvproxy), for clients without CNI (`ctr run --annotation …`):
#: comma-separated `[HOST_ADDRESS:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]`, as `-p` takes.
PORTS_ANNOTATION = "io.harpoon.network.ports"


def network_namespace(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The spec's network namespace entry; None when the container shares the host's."""
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for entry in namespaces or []:
        if isinstance(entry, dict) and entry.get("type") == "network":
            return entry
    return None


class Network(Transformer):
    def plan(self, draft: Draft) -> None:
        entry = network_namespace(draft.spec)
        mac = NIC_MAC
        published = user_network_ports(draft.spec)
        if entry is not None and entry.get("path") and published is not None:
            raise InvalidArgument(
                f"annotation {PORTS_ANNOTATION} asks for harpoon's user-mode network, but "
                f"the spec names a network namespace ({entry['path']}): it is its owner's"
            )
        if entry is None or published is not None:
            # The VM's state directory holds its gvproxy's socket (harpoon.vmm).
            state_dir = paths.vm_state_dir(draft.namespace, draft.container_id)
            socket = gvproxy.GvproxyConfig(state_dir).net_socket
            draft.nics.append(NIC(NIC_ID, mac, StreamBackend(socket, gvproxy=True)))
            return
        path = entry.get("path") or ""
        if path:
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidArgument(f"network namespace path {path!r} is not absolute")
            draft.netns, draft.netns_owned = Path(path), False
        else:
            draft.netns = paths.netns_path(draft.namespace, draft.container_id)
            draft.netns_owned = True
        draft.nics.append(NIC(NIC_ID, mac, TapBackend(wire.TAP_NAME)))

    async def with_vm(self, create: CreateContext, sandbox: Sandbox) -> None:
        import asyncio  # not at import: the daemon plans before it loads asyncio

        namespace = sandbox.config.netns
        if namespace is None:
            return
        spec = create.bundle.spec
        if sandbox.plan.netns_owned and not any(
            hooks.hooks_of(spec, phase) for phase in oci_hooks.CREATE_PHASES
        ):
            return  # harpoon's own namespace, and no hook to configure it: only loopback
        network = await asyncio.to_thread(wire.scan, namespace)
        if not network.interfaces:
            return
        if len(network.interfaces) > 1:
            names = ", ".join(interface.name for interface in network.interfaces)
            raise FailedPrecondition(
                f"the container's network namespace {namespace} has {len(network.interfaces)} "
                f"interfaces ({names}): harpoon gives a VM one"
            )
        await asyncio.to_thread(wire.after_cni, namespace, sandbox.pid)
        await asyncio.to_thread(wire.redirect, namespace, network.interfaces[0])
        create.network = network

    async def with_init(self, create: CreateContext, sandbox: Sandbox) -> None:
        if create.network is not None:
            from harpoon.shim.container import INIT_GUEST_ID

            await sandbox.configure_network(INIT_GUEST_ID, create.network)
        elif sandbox.config.nics and sandbox.config.netns is None:
            nic = sandbox.config.nics[0]
            published = user_network_ports(create.bundle.spec)
            if published is None:
                # The host's network, through gvproxy: the guest's own namespace, which
                # the container shares, gets the NIC; what listens there is published on
                # the host's loopback.
                from harpoon.sandbox.listeners import host_ports

                host = str(gvproxy.DEFAULT_HOST_LOOPBACK)
                ports = host_ports()
                await sandbox.configure_network(
                    "", user_network(nic.mac), host_loopback=host, host_ports=ports,
                    block_tcp=GVPROXY_API,
                )  # fmt: skip
                sandbox.forward_listeners(ports)
                return
            # Its own network namespace, with the ports the annotation publishes.
            from harpoon.shim.container import INIT_GUEST_ID

            await sandbox.configure_network(
                INIT_GUEST_ID, user_network(nic.mac), block_tcp=GVPROXY_API
            )
            await sandbox.publish_ports(published)


def user_network_ports(spec: dict[str, Any]) -> tuple[PublishedPort, ...] | None:
    """For a container with a network namespace of its own on harpoon's user-mode
    network, the ports it publishes; None for every other container. A namespace of its
    own is on the user-mode network when PORTS_ANNOTATION publishes ports, or, on a host
    without network namespaces (macOS: no tap to give the VM), whenever harpoon is to
    make it: then it is made in the guest alone, and publishes nothing, as
    `ctr run` without `--net-host` gives a container on Linux (plus a way out)."""
    published = published_ports(spec)
    if published is not None or linux.HAS_NETWORK_NAMESPACES:
        return published
    entry = network_namespace(spec)
    return () if entry is not None and not entry.get("path") else None


def published_ports(spec: dict[str, Any]) -> tuple[PublishedPort, ...] | None:
    """The ports PORTS_ANNOTATION publishes; None without the annotation."""
    annotations = spec.get("annotations")
    value = annotations.get(PORTS_ANNOTATION) if isinstance(annotations, dict) else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"annotation {PORTS_ANNOTATION} must be a string")
    ports = [parse_port(item.strip()) for item in value.split(",") if item.strip()]
    seen: set[tuple[str, str, int]] = set()
    for port in ports:
        key = (port.protocol, port.host_address, port.host_port)
        if key in seen:
            raise InvalidArgument(f"annotation {PORTS_ANNOTATION}: {port} is published twice")
        seen.add(key)
    return tuple(ports)


def parse_port(item: str) -> PublishedPort:
    """`[HOST_ADDRESS:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]`, as `-p` takes it."""
    body, _, protocol = item.partition("/")
    protocol = protocol or "tcp"
    parts = body.rsplit(":", 2)
    if protocol not in ("tcp", "udp") or len(parts) < 2:
        raise InvalidArgument(
            f"annotation {PORTS_ANNOTATION}: {item!r} is not "
            "[HOST_ADDRESS:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]"
        )
    address = parts[0] if len(parts) == 3 else "0.0.0.0"
    try:
        ipaddress.IPv4Address(address)
        host_port, container_port = (int(number) for number in parts[-2:])
    except ValueError:
        raise InvalidArgument(f"annotation {PORTS_ANNOTATION}: {item!r} is not valid") from None
    if not (0 < host_port < 65536 and 0 < container_port < 65536):
        raise InvalidArgument(f"annotation {PORTS_ANNOTATION}: {item!r}: ports are 1 to 65535")
    return PublishedPort(protocol, address, host_port, container_port)


def user_network(mac: str) -> wire.Network:
    """The guest's side of gvproxy's network (harpoon.net.gvproxy's defaults)."""
    subnet = gvproxy.DEFAULT_SUBNET
    address = f"{gvproxy.DEFAULT_GUEST}/{subnet.prefixlen}"
    interface = wire.Interface(NIC_ID, mac, gvproxy.DEFAULT_MTU, (address,))
    return wire.Network(
        (interface,), (wire.Route("default", str(gvproxy.DEFAULT_GATEWAY), NIC_ID),)
    )
