"""A sandbox: one VM started for one container, and the connection to its agent.

A sandbox runs one LaunchPlan (harpoon.sandbox.plan): it restores the VM template the
plan names, or boots cold. Readiness is the agent answering Hello either way: the
request is written as soon as QEMU listens and waits in the channel until the guest
opens its end, so there is no polling (a VMM that closes a connection made before the
guest listens, vfkit, is connected to again until the agent answers:
VirtualMachine.agent_waits_for_guest, AgentClient.connect_when_listening). A restore
that fails or does not answer within RESTORE_HELLO_TIMEOUT_S falls back to a cold boot;
the template is discarded only if the VMM refused its state
(harpoon.sandbox.template.TemplateRefused), never for a VM killed from outside or
stopped by the sandbox's own stop (Create refused, the shim exiting). A cold-booted
guest that does not answer within BOOT_TIMEOUT_S is killed and booted once more (about
one TCG boot in 35 hangs silently on our machines), then reported with the end of its
console. After a cold boot, once the container's process runs, the sandbox has the
missing template built in the background at the lowest CPU priority, by a process that
outlives it (harpoon.sandbox.template_builder): a container shorter than the build (most
`--rm` runs under TCG) must not leave the next one to boot cold too.

A plan with a `rootfs_share` exports that (empty) directory as its root filesystem
share and mounts it in the guest as soon as the agent answers, before any container
exists (harpoon.sandbox.rootfs); `share_rootfs` then puts the container's rootfs in.
`SandboxStarter` starts one sandbox ahead of the request for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from harpoon.net.netns import NetnsError
from harpoon.sandbox import rootfs, template, template_builder
from harpoon.sandbox.plan import LaunchPlan, prepare_network, release_network
from harpoon.sandbox.template import Template, TemplateRefused, TemplateStore
from harpoon.ttrpc.status import TtrpcError
from harpoon.vmm.backend import Backend
from harpoon.vmm.base import VirtualMachine, VMConfig, VMError, describe_exit
from harpoon.vmm.process import VmmProcess

if TYPE_CHECKING:
    # Loaded once the VMM is launching (template.restore, _boot): a shim starts its VM
    # before it imports what it needs to talk to it.
    from harpoon.api.agent.v1 import agent_pb2
    from harpoon.net.ports import PublishedPort
    from harpoon.net.wire import Network
    from harpoon.sandbox.agent_client import AgentClient
    from harpoon.sandbox.bind_shares import BindShare
    from harpoon.sandbox.binds import HostBind
    from harpoon.sandbox.listeners import Forwarder

BOOT_TIMEOUT_S = 60.0
BOOT_ATTEMPTS = 2
START_ERRORS = (VMError, TtrpcError, OSError, TimeoutError)
# How long the error of a call the VM did not answer waits for the VMM's exit status.
VMM_EXIT_WAIT_S = 2.0

log = logging.getLogger(__name__)


class Sandbox:
    def __init__(self, plan: LaunchPlan, backend: Backend) -> None:
        """plan: the VM and how it starts (harpoon.sandbox.plan); backend: the VMM that
        runs it (and may hold the plan's VMM launched early)."""
        self.plan = plan
        self._backend = backend
        self._template_build: asyncio.Task[None] | None = None
        self._listeners: asyncio.Task[None] | None = None
        self._forwarder: Forwarder | None = None
        self.template_builder: VmmProcess | None = None
        """The process building this VM's missing template, once started (it outlives
        the sandbox)."""
        self.vm: VirtualMachine | None = None
        self.agent: AgentClient | None = None
        self.hello: agent_pb2.HelloResponse | None = None
        self.boot_seconds = 0.0
        self.restored = False
        """True when the VM was restored from a template rather than booted."""
        self.guest_running = asyncio.Event()
        """Set once the host has done its part of the start and the guest runs towards
        answering Hello (the host then has time for other work)."""
        self._stopping = False
        """Set once stop() began: a restore failing from then on failed because of it."""

    @property
    def config(self) -> VMConfig:
        return self.plan.config

    @property
    def rootfs_share(self) -> Path | None:
        return self.plan.rootfs_share

    @property
    def pid(self) -> int:
        return self.vm.pid if self.vm else 0

    async def start(self) -> None:
        if self.rootfs_share is not None:
            rootfs.prepare(self.rootfs_share)
        prepare_network(self.plan)
        await self._start_vm()
        if self.rootfs_share is not None:
            assert self.agent is not None
            await rootfs.mount_share(self.agent, rootfs.share_fs(self.config.shares))

    async def _start_vm(self) -> None:
        store, found = self.plan.store, self.plan.template
        if store is not None and found is not None and await self._restore(store, found):
            return
        last_error: Exception | None = None
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                await self._boot()
                break
            except START_ERRORS as error:
                last_error = error
                log.warning("boot attempt %d of %s failed: %s", attempt, self.config.name, error)
                await self._stop_vm()
        else:
            raise VMError(f"VM {self.config.name} did not start: {last_error}")
        # A template whose restore failed without its fault (its VM killed from outside)
        # is still there: building it again would only cost a VM's worth of CPU.
        if store is not None and (found is None or not found.directory.is_dir()):
            self._template_build = asyncio.ensure_future(self._build_template_when_running(store))

    def share_rootfs(self, host_rootfs: Path) -> str:
        """Puts the container's root filesystem in the VM's share; where the guest sees
        it (rootfs.GUEST_ROOTFS)."""
        if self.rootfs_share is None or self.agent is None:
            raise VMError(f"sandbox {self.config.name} has no rootfs share to put a rootfs in")
        rootfs.attach(self.rootfs_share, host_rootfs)
        return rootfs.GUEST_ROOTFS

    async def configure_network(
        self,
        process_id: str,
        network: Network,
        host_loopback: str = "",
        host_ports: frozenset[tuple[str, int]] = frozenset(),
        block_tcp: str = "",
    ) -> None:
        """Gives the container of process_id (its created init; "": the guest's own
        namespace) the VM's NIC, configured as `network` says (what CNI configured on
        the host: harpoon.net.wire); with host_loopback, connections to 127.0.0.1 on
        host_ports (the host's listeners) that nothing in the guest answers go there
        (harpoon.agent.loopback; forward_listeners keeps the ports current)."""
        from harpoon.api.agent.v1 import agent_pb2

        if not self.config.nics or self.agent is None:
            raise VMError(f"sandbox {self.config.name} has no NIC to configure")
        (interface,) = network.interfaces
        nic = self.config.nics[0]
        # Every VM's NIC starts with the MAC the plan gives it (harpoon.shim.transform.
        # network), its template's too.
        device_mac = nic.mac
        request = agent_pb2.ConfigureNetworkRequest(
            process_id=process_id,
            device_mac=device_mac,
            interface=agent_pb2.NetworkInterface(
                name=interface.name,
                mac=interface.mac,
                mtu=interface.mtu,
                addresses=list(interface.addresses),
            ),
            routes=[
                agent_pb2.NetworkRoute(destination=route.destination, gateway=route.gateway)
                for route in network.routes
            ],
            host_loopback=host_loopback,
            block_tcp=block_tcp,
            host_ports=[
                agent_pb2.ListeningPort(protocol=protocol, port=port)
                for protocol, port in sorted(host_ports)
            ],
        )
        await self.agent.configure_network(request)

    async def publish_ports(self, ports: tuple[PublishedPort, ...]) -> None:
        """Publishes ports of the guest on the host through the VM's gvproxy; they go
        with the VM (FailedPrecondition naming a port that cannot be published)."""
        from harpoon.net.gvproxy import GvproxyConfig
        from harpoon.net.gvproxy_api import GvproxyApi
        from harpoon.sandbox import listeners

        config = GvproxyConfig(self.config.state_dir)
        await listeners.publish(GvproxyApi(config.api_socket, config.guest), ports)

    def forward_listeners(self, host_ports: frozenset[tuple[str, int]] = frozenset()) -> None:
        """Publishes what listens in the guest's own namespace on the host's loopback,
        through the VM's gvproxy, from now until the sandbox stops
        (harpoon.sandbox.listeners)."""
        from harpoon.net.gvproxy import GvproxyConfig
        from harpoon.net.gvproxy_api import GvproxyApi
        from harpoon.sandbox import listeners

        if self.agent is None or self._listeners is not None:
            return
        config = GvproxyConfig(self.config.state_dir)
        api = GvproxyApi(config.api_socket, config.guest)
        self._forwarder = listeners.Forwarder(self.agent, api, self.config.name, set(host_ports))
        self._listeners = asyncio.ensure_future(self._forwarder.run())

    async def published_before_output(self) -> None:
        """Returns once what the guest listened on before now is published (a no-op for
        a VM whose listeners are not: forward_listeners)."""
        if self._forwarder is not None and self._listeners is not None:
            await self._forwarder.caught_up()

    def share_binds(self, binds: tuple[HostBind, ...]) -> None:
        """Binds host paths into the VM's share (harpoon.sandbox.binds)."""
        if not binds:
            return
        if self.rootfs_share is None or self.agent is None:
            raise VMError(f"sandbox {self.config.name} has no share to bind host paths into")
        from harpoon.sandbox import binds as host_binds

        host_binds.attach(self.rootfs_share, binds)

    async def mount_bind_shares(self, shares: tuple[BindShare, ...]) -> None:
        """Mounts the VM's bind shares in the guest (harpoon.sandbox.bind_shares)."""
        if not shares:
            return
        if self.agent is None:
            raise VMError(f"sandbox {self.config.name} has no agent to mount bind shares")
        from harpoon.sandbox import bind_shares

        await bind_shares.mount(self.agent, shares, self.config.shares)

    async def _restore(self, store: TemplateStore, found: Template) -> bool:
        began = time.monotonic()
        try:
            self.vm, self.agent, self.hello = await template.restore(
                self._backend.new_vm, self.config, found, resumed=self.guest_running
            )
        except START_ERRORS as error:
            if self._stopping:
                raise  # its VM was ended by our own stop
            if isinstance(error, TemplateRefused):
                log.warning("%s: booting cold and rebuilding the template: %s",
                            self.config.name, error)  # fmt: skip
                store.discard(found)
            else:  # killed from outside, or too slow: nothing says the template is bad
                log.warning("restoring %s from template %s failed, booting cold: %s",
                            self.config.name, found.key, error)  # fmt: skip
            return False
        self.boot_seconds = time.monotonic() - began
        self.restored = True
        store.mark_used(found)
        log.info("restored %s from template %s in %.2f s", self.config.name, found.key,
                 self.boot_seconds)  # fmt: skip
        return True

    async def _build_template_when_running(self, store: TemplateStore) -> None:
        """Has this VM's missing template built once the container runs, so that it takes
        nothing from the container's start, by a process that outlives this sandbox
        (harpoon.sandbox.template_builder); waits for it while this sandbox lives."""
        agent = self.agent
        assert agent is not None
        await agent.process_started.wait()
        if store.building():
            return  # that build makes the same template, or the next cold boot asks again
        try:
            builder = template_builder.spawn(
                # Neutral: the builder names nothing of this container (its own paths
                # replace every per-instance one), so nothing outlives the container
                # that names it.
                replace(self.config.neutral(), low_priority=True),
                self._backend.name,
                store.root,
            )
        except OSError as error:
            log.warning("building a VM template for %s failed: %s", self.config.name, error)
            return
        self.template_builder = builder
        await builder.wait()

    async def _boot(self) -> None:
        began = time.monotonic()
        vm = self._backend.new_vm(self.config)
        self.vm = vm
        await vm.start()
        from harpoon.sandbox.agent_client import AgentClient

        hello: asyncio.Future[agent_pb2.HelloResponse]
        if vm.agent_waits_for_guest:
            self.agent = await AgentClient.connect(
                str(self.config.agent_socket), str(self.config.stdio_socket)
            )
            hello = asyncio.ensure_future(self.agent.hello(BOOT_TIMEOUT_S, warm_up=vm.emulated))
        else:
            hello = asyncio.ensure_future(self._connect_when_listening(vm))
        self.guest_running.set()
        died = asyncio.ensure_future(vm.wait())
        done, _ = await asyncio.wait(
            {hello, died}, timeout=BOOT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if hello in done and hello.exception() is None:
            died.cancel()
        else:
            if hello not in done:
                hello.cancel()
                reason = f"no answer from the agent within {BOOT_TIMEOUT_S:.0f} s"
            else:
                reason = f"the agent connection failed ({hello.exception()})"
                # The channel closes as the VMM exits: give it a moment to say how.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(died), 2.0)
            if died.done():
                reason += f"; the VMM exited with status {died.result()}"
            died.cancel()
            raise VMError(f"{reason}; console:\n{vm.console_tail()}")
        self.hello = hello.result()
        self.boot_seconds = time.monotonic() - began

    async def _connect_when_listening(self, vm: VirtualMachine) -> agent_pb2.HelloResponse:
        """The agent's Hello through a VMM that closes connections made before the
        guest listens (VirtualMachine.agent_waits_for_guest): connected again until the
        agent answers (bounded by _boot's timeout and by the VMM's life)."""
        from harpoon.sandbox.agent_client import AgentClient

        self.agent, hello = await AgentClient.connect_when_listening(
            str(self.config.agent_socket),
            str(self.config.stdio_socket),
            BOOT_TIMEOUT_S,
            warm_up=vm.emulated,
        )
        return hello

    async def how_it_ended(self, wait_s: float = VMM_EXIT_WAIT_S) -> str:
        """How the VM ended, in words, for the error of a call it did not live to answer:
        its VMM's exit status (the agent's channel closes as the VMM exits, and the exit
        status follows at once), or "is still running" if it has not ended."""
        vm = self.vm
        if vm is None:
            return "was not started"
        if vm.exit_status is None:
            with contextlib.suppress(TimeoutError, VMError):
                await asyncio.wait_for(vm.wait(), wait_s)
        return describe_exit(vm.exit_status)

    async def kill_vm(self) -> None:
        """Kills the VMM at once (a guest that does not answer); stop() still releases
        the rest."""
        if self.vm is not None:
            await self.vm.kill()

    async def stop(self) -> None:
        """Tears the VM down (and any template build it started), then releases the
        rootfs share; idempotent."""
        self._stopping = True
        try:
            await self._stop_vm()
        finally:
            try:
                release_network(self.plan)
            except NetnsError as error:  # `shim delete` removes harpoon's namespace
                log.warning("releasing the network of %s: %s", self.config.name, error)
            if self.rootfs_share is not None:
                try:
                    rootfs.release(self.rootfs_share)
                except OSError as error:  # `shim delete` tries again
                    log.warning("releasing the rootfs share of %s: %s", self.config.name, error)

    async def _stop_vm(self) -> None:
        # A template builder already running goes on without this sandbox; one not yet
        # started never starts.
        forwarding, self._listeners = self._listeners, None
        if forwarding is not None:
            forwarding.cancel()
            await asyncio.wait({forwarding})
        building, self._template_build = self._template_build, None
        if building is not None:
            building.cancel()
            await asyncio.wait({building})
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()
            self.agent = None
        if self.vm is not None:
            # Killed, not shut down: a container's guest holds nothing to save (its
            # files are written through to the host as it writes them).
            await self.vm.kill()


class SandboxStarter:
    """Starts sandboxes, and at most one ahead of the request for it: a shim starts its
    container's VM from the bundle while containerd is still sending Create, and Create
    takes it if it was started for the same plan.

    A prestarted sandbox that is not taken is stopped: when Create asks for another
    plan (before the new one starts: they share their state directory), when no Create
    comes within `expire_after_s`, and on close(). Its start failing is no error of
    Create's: Create then starts a new one."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._early: Sandbox | None = None
        self._starting: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expired: asyncio.Task[None] | None = None

    @property
    def early_plan(self) -> LaunchPlan | None:
        """The plan of the sandbox started ahead, until it is taken or stopped."""
        return self._early.plan if self._early is not None else None

    def new(self, plan: LaunchPlan) -> Sandbox:
        return Sandbox(plan, self.backend)

    def prestart(self, plan: LaunchPlan, expire_after_s: float = 60.0) -> None:
        """Begins starting a sandbox for plan in the background."""
        if self._early is not None:
            raise RuntimeError("a sandbox is already prestarted")
        sandbox = self.new(plan)
        self._early = sandbox
        self._starting = asyncio.ensure_future(sandbox.start())
        self._starting.add_done_callback(_retrieve)
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(expire_after_s, self._expire)

    async def wait_guest_running(self, timeout: float) -> None:
        """Returns once the prestarted sandbox's guest runs (Sandbox.guest_running), its
        start ended, or after timeout; at once if there is none. The daemon imports what
        serves containerd while the guest comes up, not while QEMU waits for the host."""
        early, starting = self._early, self._starting
        if early is None or starting is None:
            return
        running = asyncio.ensure_future(early.guest_running.wait())
        await asyncio.wait(
            {running, starting}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        running.cancel()

    def _expire(self) -> None:
        if self._early is not None:
            log.warning("no Create came for the VM started ahead for %s: stopping it",
                        self._early.config.name)  # fmt: skip
        self._expired = asyncio.ensure_future(self.close())

    async def start(self, plan: LaunchPlan) -> Sandbox:
        """A started sandbox for plan: the prestarted one if it is for the same VM and
        started, else a new one. The caller owns (and stops) what this returns."""
        early = await self._take(plan)
        if early is not None:
            return early
        sandbox = self.new(plan)
        try:
            await sandbox.start()
        except BaseException:
            await sandbox.stop()
            raise
        return sandbox

    async def _take(self, plan: LaunchPlan) -> Sandbox | None:
        early, starting = self._early, self._starting
        if early is None or starting is None:
            return None
        if early.config != plan.config or early.rootfs_share != plan.rootfs_share:
            # Expected when only the disks differ: a rootfs of disks (the erofs path) is
            # known at Create alone; anything else says the two plans disagree.
            expected = replace(early.config, disks=()) == replace(plan.config, disks=())
            log.log(logging.INFO if expected else logging.WARNING,
                    "the VM started ahead for %s does not fit its Create: starting another",
                    plan.config.name)  # fmt: skip
            await self.close()
            return None
        # Create has come: however long the start takes now, it is Create's to wait for
        # (a cold boot may retry for minutes), not the expiry's to cut short.
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        # Cancelling the caller (Create) leaves the sandbox ours, to take again or stop.
        await asyncio.wait({starting})
        if self._early is not early:
            return None  # expired or closed meanwhile
        self._forget()
        error = starting.exception() if not starting.cancelled() else None
        if starting.cancelled() or error is not None:
            log.warning("the VM started ahead for %s failed (%s): starting another",
                        plan.config.name, error or "cancelled")  # fmt: skip
            await early.stop()
            return None
        return early

    def _forget(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._early = self._starting = self._expiry = None

    async def close(self) -> None:
        """Stops the prestarted sandbox unless it was taken; idempotent."""
        early, starting = self._early, self._starting
        self._forget()
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
        if early is not None:
            await early.stop()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Marks a background start's exception as seen: whoever takes it reports it."""
    if not task.cancelled():
        task.exception()
