"""A fake VMM for unit tests of the shim: its VMs run no guest kernel but serve the real
guest agent (harpoon.agent.service.AgentService) in this process, over ttrpc, on the
VM's two unix sockets, with crun replaced by tests/unit/fake_crun.py.

What a real guest's kernel and initramfs give the agent is stood in for by a FakeGuest,
on directories of the host's, so that nothing of the host is touched:

- crun's state (oci.STATE_ROOT) and the bundles (oci.BUNDLES): directories of the
  guest's, emptied when a VM ends (a guest's /run dies with it);
- the container's cgroup (cgroups.CGROUP_ROOT): a plain directory whose cgroup.procs
  the fake crun writes, so that cgroup2 is never mounted nor the host's cgroups
  written; its `cgroup.kill` is FakeGuest.kill_container_group (SIGKILL of what it
  lists, as the kernel does);
- the rootfs share's 9p mount (the agent's Mount): a symlink from the guest's mount
  point to the VM's share directory on the host, which the sandbox really bind-mounts
  the rootfs into;
- the agent's host-wide acts: `sethostname` and the network's configuration
  (ConfigureNetwork) are recorded, not done; ListeningPorts lists nothing; Hello's entropy and
  clock are not applied (a real Hello would set the host's clock); the warm-up is off
  (the fake guest has one vCPU); crun is not copied into a sealed memfd (a script
  cannot be run from a close-on-exec one).

The agent is PID 1 of its guest: it reaps every process crun leaves behind. Here the
test process is made a child subreaper while a VM runs and the agent's table reaps on
SIGCHLD, as in the guest. When a VM ends, its guest's processes are killed and reaped
and the agent's descriptors closed, as a VM's death frees them. One VM runs at a time
(one process has one SIGCHLD handler).

With `FakeBackend.closed_before_listening` = N its VMs behave as vfkit's, whose agent
sockets close each connection made before the guest's agent listens: the first N
connections to the agent or stdio socket are closed unserved, and the VMs say
`agent_waits_for_guest` False (harpoon.sandbox.agent_client retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from harpoon import linux
from harpoon.agent import cgroups, oci, warm_up
from harpoon.agent.processes import ProcessTable
from harpoon.agent.service import AgentService
from harpoon.api.agent.v1 import agent_pb2
from harpoon.errdefs import FailedPrecondition, Unimplemented
from harpoon.sandbox import rootfs
from harpoon.ttrpc.server import CallContext, Server
from harpoon.ttrpc.service import register_service
from harpoon.vmm.backend import Backend
from harpoon.vmm.base import VirtualMachine, VMConfig, VMError

FAKE_CRUN_SOURCE = Path(__file__).with_name("fake_crun.py")
CGROUP_ROOT_ENV = "HARPOON_FAKE_CGROUP_ROOT"
CRUN_FAIL_ENV = "HARPOON_FAKE_CRUN_FAIL"


def our_child(pid: int) -> bool:
    """Whether pid is a (live or unreaped) child of this process: only those are the
    guest's (the fake kernel never signals a pid that may have been reused)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


class FakeGuest:
    """What the fake VMs' guest is made of, under one host directory (see the module)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.share_mount = root / "share"
        self.crun_state = root / "crun"
        self.bundles = root / "bundles"
        self.cgroup_root = root / "cgroup"
        self.container_group = self.cgroup_root / "container"
        self.hostnames: list[str] = []
        self.fail_mount = False
        for directory in (self.crun_state, self.bundles, self.container_group):
            directory.mkdir(parents=True)
        # Its presence is what keeps ensure_container_group from mounting cgroup2.
        (self.cgroup_root / "cgroup.controllers").write_text("cpu memory pids io\n")
        crun = root / "crun-bin"
        crun.write_text(f"#!{sys.executable} -IS\n{FAKE_CRUN_SOURCE.read_text()}")
        crun.chmod(0o755)
        monkeypatch.setattr(oci, "CRUN", str(crun))
        monkeypatch.setattr(oci, "sealed_copy", lambda path: None)
        monkeypatch.setattr(oci, "STATE_ROOT", str(self.crun_state))
        monkeypatch.setattr(oci, "BUNDLES", str(self.bundles))
        monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(self.cgroup_root))
        monkeypatch.setattr(cgroups, "CONTAINER_GROUP", str(self.container_group))
        monkeypatch.setattr(cgroups, "kill_container_group", self.kill_container_group)
        monkeypatch.setattr(linux, "sethostname", self.hostnames.append)
        self.networks: list[agent_pb2.ConfigureNetworkRequest] = []
        monkeypatch.setattr(warm_up, "spare_vcpu", lambda: False)
        monkeypatch.setattr(rootfs, "GUEST_SHARE", str(self.share_mount))
        monkeypatch.setattr(rootfs, "GUEST_ROOTFS", str(self.share_mount / rootfs.ROOTFS_NAME))
        monkeypatch.setenv(CGROUP_ROOT_ENV, str(self.cgroup_root))
        monkeypatch.delenv(CRUN_FAIL_ENV, raising=False)
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    @property
    def _procs(self) -> Path:
        return self.container_group / "cgroup.procs"

    def container_pids(self) -> list[int]:
        """The container's processes still there (cgroup.procs, as the kernel keeps it)."""
        try:
            listed = [int(line) for line in self._procs.read_text().split()]
        except FileNotFoundError:
            return []
        return [pid for pid in dict.fromkeys(listed) if our_child(pid)]

    def prune(self) -> None:
        """Drops the reaped from cgroup.procs, as the kernel does."""
        self._procs.write_text("".join(f"{pid}\n" for pid in self.container_pids()))

    def kill_container_group(self) -> None:
        """cgroup.kill: SIGKILL to every process of the container's group."""
        for pid in self.container_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def power_off(self) -> None:
        """What goes with a VM: its /run (crun's state, bundles), its mounts."""
        for directory in (self.crun_state, self.bundles):
            for entry in directory.iterdir():
                shutil.rmtree(entry)
        with contextlib.suppress(FileNotFoundError):
            self.share_mount.unlink()
        self._procs.unlink(missing_ok=True)


class GuestAgentService(AgentService):
    """The real agent service, but for what only a guest kernel can do (see the module)."""

    def __init__(self, table: ProcessTable, guest: FakeGuest, config: VMConfig) -> None:
        super().__init__(table, time.monotonic())
        self.guest = guest
        self.config = config

    async def Hello(
        self, request: agent_pb2.HelloRequest, ctx: CallContext
    ) -> agent_pb2.HelloResponse:
        # Not the host's entropy pool nor its clock.
        request.ClearField("entropy")
        request.ClearField("host_time")
        return await super().Hello(request, ctx)

    async def Mount(self, request: agent_pb2.MountRequest, ctx: CallContext) -> empty_pb2.Empty:
        if self.guest.fail_mount:
            raise FailedPrecondition(f"mount {request.source} failed as the test asked")
        shares = {share.tag: share.host_path for share in self.config.shares}
        if request.fstype != "9p" or request.source not in shares:
            raise Unimplemented(f"the fake guest mounts only its 9p shares, not {request}")
        # The 9p mount of the share: the guest sees the host's directory, as 9p shows it.
        target = Path(request.target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shares[request.source])
        return empty_pb2.Empty()

    async def ConfigureNetwork(
        self, request: agent_pb2.ConfigureNetworkRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        # No NIC, no network namespace of a guest's: recorded, as sethostname is.
        self.guest.networks.append(request)
        return empty_pb2.Empty()

    async def ListeningPorts(
        self, request: empty_pb2.Empty, ctx: CallContext
    ) -> agent_pb2.ListeningPortsResponse:
        # The host's /proc/net would list the host's own listeners.
        return agent_pb2.ListeningPortsResponse()


class FakeVM(VirtualMachine):
    """A VM whose guest is the agent served in this process (see the module)."""

    def __init__(self, config: VMConfig, backend: FakeBackend) -> None:
        super().__init__(config)
        self.backend = backend
        self._waits_for_guest = not backend.closed_before_listening
        self.running = False
        self.started = False
        self._ended: asyncio.Event | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self.server = Server()
        self.table = ProcessTable()

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def agent_waits_for_guest(self) -> bool:
        return self._waits_for_guest

    async def start(self) -> None:
        if self.backend.fail_start:
            raise VMError(f"VM {self.config.name}: the fake VMM failed to start, as asked")
        if any(vm.running for vm in self.backend.vms):
            raise VMError("the fake VMM runs one VM at a time")
        self.started = True
        self._ended = asyncio.Event()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        service = GuestAgentService(self.table, self.backend.guest, self.config)
        register_service(self.server, agent_pb2.DESCRIPTOR.services_by_name["Agent"], service)
        self.running = True
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self._reap)
        for kind, path in (
            ("agent", self.config.agent_socket),
            ("stdio", self.config.stdio_socket),
        ):
            serve = functools.partial(self._serve, kind)
            self._listeners.append(await asyncio.start_unix_server(serve, path=str(path)))

    def _reap(self) -> None:
        self.table.reap()
        self.backend.guest.prune()

    async def _serve(
        self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.backend.closed_before_listening > 0:
            self.backend.closed_before_listening -= 1
            self.backend.connections.append((kind, "closed"))
            writer.close()  # as vfkit does when its dial to the guest's port fails
            return
        self.backend.connections.append((kind, "served"))
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self.server.serve_connection(reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()

    async def wait(self) -> int:
        assert self._ended is not None, "wait() before start()"
        await self._ended.wait()
        return -signal.SIGKILL

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        for listener in self._listeners:
            listener.close()
            await listener.wait_closed()
        for path in (self.config.agent_socket, self.config.stdio_socket):
            path.unlink(missing_ok=True)
        await self.server.close()
        if self._connections:
            await asyncio.wait(self._connections)
        self._end_guest()
        assert self._ended is not None
        self._ended.set()

    def _end_guest(self) -> None:
        """The guest dies: every process it had is killed and reaped, every descriptor
        its agent held is closed."""
        guest = self.backend.guest
        table = self.table
        # The table's internals: what a real VM's death frees without anyone asking.
        processes = list(table._by_id.values())
        pids = {*guest.container_pids(), *table._helpers, *(p.pid for p in processes if p.pid)}
        pids = {pid for pid in pids if our_child(pid)}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
        table.reap()
        asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)
        for process in processes:
            if process.exit_status is None and process.started:
                process.exit_status = 128 + signal.SIGKILL
            table.delete(process)
        guest.power_off()


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.vms: list[FakeVM] = []
        self.fail_start = False
        self.closed_before_listening = 0
        """How many connections are closed unserved, as vfkit's (see the module)."""
        self.connections: list[tuple[str, str]] = []
        """(socket, "closed" or "served") of each connection to the VMs' sockets."""

    def new_vm(self, config: VMConfig) -> VirtualMachine:
        vm = FakeVM(config, self)
        self.vms.append(vm)
        return vm

    def launch_early(self, config: VMConfig, restoring: Path | None) -> None:
        raise VMError("the fake VMM launches nothing early")

    async def discard_early(self) -> None:
        pass
