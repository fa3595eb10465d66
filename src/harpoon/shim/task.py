"""The containerd Task service (containerd.task.v2.Task and v3.Task): one container,
its VM, its init process and its execs, with runc's shim as the behavioural reference.

Lifecycle of a process: created (prepared in the guest, stdio connected) → running
(Start) → stopped (its exit recorded, TaskExit published) → deleted. The init's
Create boots the VM and its Delete tears it down (TaskDelete published); the init's
exit is published after every exec's. Events go through one ordered publisher, so containerd
sees create → start → exit → delete. Methods not yet implemented answer
Unimplemented with a message saying so; they never pretend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.events import task_pb2 as events
from harpoon.api.containerd.runc.v1 import process_pb2
from harpoon.api.containerd.task.v2 import shim_pb2 as task
from harpoon.api.containerd.types import task_pb2 as types
from harpoon.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.rootfs import GUEST_ROOTFS
from harpoon.sandbox.sandbox import Sandbox, SandboxStarter
from harpoon.shim import paths
from harpoon.shim.bundle import Bundle, mount_rootfs, unmount_rootfs
from harpoon.shim.events import EventPublisher
from harpoon.shim.guest_spec import encode, process_for_guest, spec_for_guest
from harpoon.shim.prestart import rootfs_share, vm_config
from harpoon.shim.resources import cgroup_limits, spec_resources, vm_size
from harpoon.shim.stdio import ProcessIO, StdinForwarder, open_stdin, pump
from harpoon.ttrpc.server import CallContext
from harpoon.ttrpc.status import Code, TtrpcError
from harpoon.vmm.base import VMConfig, VMError

INIT_GUEST_ID = "init"
EXEC_GUEST_PREFIX = "exec:"
# How long the init's exit waits for its execs' exits to be published first.
EXEC_EXIT_WAIT_S = 10.0
# How long an exit waits for its output to reach the client before it is reported.
OUTPUT_FLUSH_WAIT_S = 2.0
# How long CloseIO waits for buffered stdin to reach the guest before the EOF.
STDIN_DRAIN_S = 10.0
VM_DIED_EXIT_STATUS = 255
EXEC_FAILED_EXIT_STATUS = 127
EMPTY = empty_pb2.Empty()

log = logging.getLogger(__name__)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


@dataclass
class HostProcess:
    """The shim's record of one process of the container: its init or an exec."""

    exec_id: str  # "" for the container's init
    guest_id: str  # the process's id in the agent
    spec: dict[str, Any]  # the OCI process
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    io: ProcessIO
    status: types.Status = types.CREATED
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    waiter: asyncio.Task[None] | None = None
    stdin_fd: int | None = None
    stdin_forwarder: StdinForwarder | None = None
    stdin_task: asyncio.Task[None] | None = None
    io_done: asyncio.Future[None] | None = None

    def release_stdin(self) -> None:
        if self.stdin_forwarder is not None:
            self.stdin_forwarder.close()
        if self.stdin_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.stdin_fd)
            self.stdin_fd = None


@dataclass
class Container:
    id: str
    bundle: Bundle
    sandbox: Sandbox
    init: HostProcess
    rootfs_mounted: bool
    # The init's OCI spec as crun runs it in the guest (see harpoon.shim.guest_spec).
    guest_spec: bytes = b""
    execs: dict[str, HostProcess] = field(default_factory=dict)

    @property
    def agent(self) -> AgentClient:
        agent = self.sandbox.agent
        if agent is None:
            raise FailedPrecondition(f"the VM of container {self.id!r} is not running")
        return agent


def _create_request(container: Container, process: HostProcess) -> agent_pb2.CreateProcessRequest:
    """The agent's request for a container process, which crun runs in the guest: the
    whole guest spec for the init, the OCI process for an exec."""
    init = process is container.init
    return agent_pb2.CreateProcessRequest(
        id=process.guest_id,
        terminal=process.terminal,
        stdin=bool(process.stdin),
        stdout=process.io.stdout is not None,
        stderr=process.io.stderr is not None and not process.terminal,
        container_init=init,
        oci_json=container.guest_spec if init else encode(process_for_guest(process.spec)),
        container_id="" if init else INIT_GUEST_ID,
        # The guest's own name, for a container without a UTS namespace of its own: the
        # host's, as such a runc container would see.
        hostname=socket.gethostname() if init else "",
    )


class TaskService:
    def __init__(
        self,
        namespace: str,
        publisher: EventPublisher,
        make_vm: Callable[[VMConfig], Any],
        find_image: Callable[[], Any],
        on_shutdown: Callable[[], None],
        sandboxes: SandboxStarter | None = None,
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.make_vm = make_vm
        self.find_image = find_image
        self.on_shutdown = on_shutdown
        # Starts the container's VM, or hands over the one the daemon started ahead.
        self.sandboxes = sandboxes or SandboxStarter(make_vm)
        self.container: Container | None = None

    # -- helpers -------------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        if self.container is None or self.container.id != container_id:
            raise NotFound(f"container {container_id!r} not created")
        return self.container

    def _process(self, container_id: str, exec_id: str) -> tuple[Container, HostProcess]:
        container = self._container(container_id)
        if not exec_id:
            return container, container.init
        try:
            return container, container.execs[exec_id]
        except KeyError:
            raise NotFound(f"process {exec_id!r} does not exist in {container_id!r}") from None

    def _open_io(self, request: task.CreateTaskRequest | task.ExecProcessRequest) -> ProcessIO:
        """The host ends of a new process's output (a terminal has no stderr)."""
        return ProcessIO.open(
            request.stdout,
            "" if request.terminal else request.stderr,
            namespace=self.namespace,
            container_id=request.id,
        )

    async def _prepare(self, container: Container, process: HostProcess) -> None:
        """Creates the process in the guest and connects its stdio to containerd's."""
        agent = container.agent
        await agent.create_process(_create_request(container, process))
        streams = ((agent_pb2.STDOUT, process.io.stdout), (agent_pb2.STDERR, process.io.stderr))
        for stream, fd in streams:
            if fd is not None and not (process.terminal and stream == agent_pb2.STDERR):
                output = agent.read_output(process.guest_id, stream)
                process.pumps.append(asyncio.ensure_future(pump(output, fd)))
        if process.stdin:
            process.stdin_fd = open_stdin(process.stdin)
            process.stdin_forwarder = StdinForwarder(process.stdin_fd)
            process.stdin_task = asyncio.ensure_future(
                self._forward_stdin(agent, process, process.stdin_forwarder)
            )

    async def _forward_stdin(
        self, agent: AgentClient, process: HostProcess, forwarder: StdinForwarder
    ) -> None:
        try:
            await agent.write_stdin(process.guest_id, forwarder.chunks())
        except (TtrpcError, OSError) as error:
            # The process exited (or closed its stdin) before reading all of it.
            log.debug("stdin of %s ended: %s", process.guest_id, error)

    async def _start(self, container: Container, process: HostProcess) -> int:
        if process.status != types.CREATED:
            raise FailedPrecondition(f"process {process.guest_id!r} has already been started")
        try:
            await container.agent.start_process(process.guest_id)
        except TtrpcError:
            # It never ran: stopped, so that a client can delete it (runc's exit 127
            # for a process that could not be exec'd).
            process.io.close()
            process.release_stdin()
            self._record_exit(container, process, EXEC_FAILED_EXIT_STATUS, _now(), publish=False)
            raise
        process.status = types.RUNNING
        return container.sandbox.pid

    async def _wait(self, container: Container, process: HostProcess) -> None:
        """Follows a started process to its exit, then publishes it."""
        try:
            response = await container.agent.wait_process(process.guest_id)
            status, exited_at = response.exit_status, response.exited_at
            if response.oom_killed:
                self.publisher.publish("/tasks/oom", events.TaskOOM(container_id=container.id))
        except (TtrpcError, OSError) as error:
            log.error("lost the VM of %s: %s", container.id, error)
            status, exited_at = VM_DIED_EXIT_STATUS, _now()
        # Every byte reaches containerd's FIFOs before anyone hears of the exit, unless
        # nobody reads them: then the exit goes first (clients wait for EOF on their
        # FIFOs before they delete, and EOF comes when the pumps are done).
        pumps = [p for p in process.pumps if not p.done()]
        if pumps:
            await asyncio.wait(pumps, timeout=OUTPUT_FLUSH_WAIT_S)
        process.io_done = asyncio.ensure_future(self._finish_io(process))
        process.release_stdin()
        if process is container.init:
            # The init's exit is the container's last: execs die with it (the agent
            # kills every process when the init exits) and are reported first.
            execs = [e.waiter for e in container.execs.values() if e.waiter is not None]
            if execs:
                await asyncio.wait(execs, timeout=EXEC_EXIT_WAIT_S)
        self._record_exit(container, process, status, exited_at)

    @staticmethod
    async def _finish_io(process: HostProcess) -> None:
        await asyncio.gather(*process.pumps, return_exceptions=True)
        process.io.close()  # EOF for the client

    def _record_exit(
        self,
        container: Container,
        process: HostProcess,
        status: int,
        exited_at: timestamp_pb2.Timestamp,
        *,
        publish: bool = True,
    ) -> None:
        """Marks a process stopped and (unless it never started) publishes its exit."""
        process.exit_status, process.exited_at = status, exited_at
        process.status = types.STOPPED
        if not publish:
            process.exited.set()
            return
        self.publisher.publish(
            "/tasks/exit",
            events.TaskExit(
                container_id=container.id,
                id=process.exec_id or container.id,
                pid=container.sandbox.pid,
                exit_status=status,
                exited_at=exited_at,
            ),
        )
        process.exited.set()

    # -- Task methods ----------------------------------------------------------------

    async def Create(  # noqa: C901 (being rewritten: issue 12)
        self, request: task.CreateTaskRequest, ctx: CallContext
    ) -> task.CreateTaskResponse:
        if self.container is not None:
            raise AlreadyExists(f"container {self.container.id!r} already exists in this shim")
        if request.checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported by harpoon")
        bundle = Bundle.load(request.bundle)
        # Before any VM exists: a spec harpoon cannot run in one fails here.
        guest_spec = encode(
            spec_for_guest(bundle.spec, guest_root=GUEST_ROOTFS, host_hostname=socket.gethostname())
        )
        try:
            image = self.find_image()
        except Exception as error:
            raise FailedPrecondition(f"no guest image: {error}") from None
        rootfs = bundle.path / "rootfs" if request.rootfs else bundle.rootfs
        size = vm_size(bundle.spec)
        state_dir = paths.vm_state_dir(self.namespace, request.id)
        io = self._open_io(request)
        sandbox: Sandbox | None = None
        mounted = False
        container: Container | None = None
        try:
            if request.rootfs:
                mount_rootfs(rootfs, list(request.rootfs))
                mounted = True
            elif not rootfs.is_dir():
                raise FailedPrecondition(f"the rootfs {rootfs} is not a directory")
            config = vm_config(self.namespace, request.id, image, size)
            sandbox = await self.sandboxes.start(config, rootfs_share(config))
            sandbox.share_rootfs(rootfs)
            assert sandbox.agent is not None
            limits = cgroup_limits(spec_resources(bundle.spec), size.memory_mib)
            if limits.ListFields():
                await sandbox.agent.update_resources(limits)
            init = HostProcess(
                exec_id="",
                guest_id=INIT_GUEST_ID,
                spec=bundle.process,
                stdin=request.stdin,
                stdout=request.stdout,
                stderr=request.stderr,
                terminal=request.terminal,
                io=io,
            )
            container = Container(request.id, bundle, sandbox, init, mounted, guest_spec)
            await self._prepare(container, init)
        except BaseException:
            if container is not None:
                container.init.release_stdin()
            if sandbox is not None:
                await sandbox.stop()
            io.close()
            if mounted:
                unmount_rootfs(rootfs)
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        self.container = container
        log.info(
            "created %s: VM pid %d booted in %.2f s",
            request.id,
            sandbox.pid,
            sandbox.boot_seconds,
        )
        self.publisher.publish(
            "/tasks/create",
            events.TaskCreate(
                container_id=request.id,
                bundle=request.bundle,
                rootfs=request.rootfs,
                io=events.TaskIO(
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    terminal=request.terminal,
                ),
                checkpoint=request.checkpoint,
                pid=sandbox.pid,
            ),
        )
        return task.CreateTaskResponse(pid=sandbox.pid)

    async def Start(self, request: task.StartRequest, ctx: CallContext) -> task.StartResponse:
        container, process = self._process(request.id, request.exec_id)
        pid = await self._start(container, process)
        # Published before the waiter can publish the exit, however fast the process.
        if process.exec_id:
            self.publisher.publish(
                "/tasks/exec-started",
                events.TaskExecStarted(container_id=container.id, exec_id=process.exec_id, pid=pid),
            )
        else:
            self.publisher.publish(
                "/tasks/start", events.TaskStart(container_id=container.id, pid=pid)
            )
        process.waiter = asyncio.ensure_future(self._wait(container, process))
        return task.StartResponse(pid=pid)

    async def Exec(self, request: task.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(request.id)
        if not request.exec_id:
            raise InvalidArgument("exec needs an exec id")
        if request.exec_id in container.execs:
            raise AlreadyExists(f"id {request.exec_id}")
        if container.init.status != types.RUNNING:
            raise FailedPrecondition(
                f"cannot exec in container {request.id!r}: its init process is not running"
            )
        try:
            spec = json.loads(request.spec.value)
        except ValueError as error:
            raise InvalidArgument(f"the exec's process spec is not JSON: {error}") from None
        if not isinstance(spec, dict) or not spec.get("args"):
            raise InvalidArgument("the exec's process spec has no args")
        io = self._open_io(request)
        process = HostProcess(
            exec_id=request.exec_id,
            guest_id=f"{EXEC_GUEST_PREFIX}{request.exec_id}",
            spec=spec,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            terminal=request.terminal,
            io=io,
        )
        try:
            await self._prepare(container, process)
        except BaseException:
            process.release_stdin()
            io.close()
            raise
        container.execs[request.exec_id] = process
        self.publisher.publish(
            "/tasks/exec-added",
            events.TaskExecAdded(container_id=container.id, exec_id=request.exec_id),
        )
        return EMPTY

    async def Delete(self, request: task.DeleteRequest, ctx: CallContext) -> task.DeleteResponse:
        container, process = self._process(request.id, request.exec_id)
        if process.status == types.RUNNING:
            raise FailedPrecondition(
                f"cannot delete process {process.exec_id or container.id!r}: it is still running"
            )
        pid = container.sandbox.pid
        exited_at = process.exited_at or _now()
        response = task.DeleteResponse(
            pid=pid, exit_status=process.exit_status, exited_at=exited_at
        )
        if process.exec_id:
            self._cancel(process)
            with contextlib.suppress(TtrpcError):
                await container.agent.delete_process(process.guest_id)
            del container.execs[process.exec_id]
            return response
        await self._teardown(container)
        self.publisher.publish(
            "/tasks/delete",
            events.TaskDelete(
                container_id=container.id,
                pid=pid,
                exit_status=process.exit_status,
                exited_at=exited_at,
            ),
        )
        self.container = None
        return response

    @staticmethod
    def _cancel(process: HostProcess) -> None:
        for running in (process.waiter, process.stdin_task, process.io_done, *process.pumps):
            if running is not None and not running.done():
                running.cancel()
        process.io.close()
        process.release_stdin()

    async def _teardown(self, container: Container) -> None:
        for process in (container.init, *container.execs.values()):
            self._cancel(process)
        await container.sandbox.stop()
        if container.rootfs_mounted:
            unmount_rootfs(container.bundle.path / "rootfs")
        shutil.rmtree(container.sandbox.config.state_dir, ignore_errors=True)

    async def Kill(self, request: task.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        container, process = self._process(request.id, request.exec_id)
        if process.status == types.STOPPED:
            raise NotFound("process already finished")  # runc's words
        if container.init.status == types.PAUSED:
            # The guest's vCPUs are stopped: the agent could not deliver it until then.
            raise FailedPrecondition(f"container {container.id!r} is paused: resume it first")
        if process.status == types.CREATED:
            # Nothing runs in the guest yet: the process dies before it ever starts.
            self._record_exit(container, process, 128 + request.signal, _now())
            return EMPTY
        try:
            await container.agent.signal_process(
                process.guest_id, request.signal, request.all and not process.exec_id
            )
        except TtrpcError as error:
            if error.code == Code.NOT_FOUND:
                raise NotFound("process already finished") from None
            raise
        return EMPTY

    async def Wait(self, request: task.WaitRequest, ctx: CallContext) -> task.WaitResponse:
        _, process = self._process(request.id, request.exec_id)
        await process.exited.wait()
        return task.WaitResponse(exit_status=process.exit_status, exited_at=process.exited_at)

    async def State(self, request: task.StateRequest, ctx: CallContext) -> task.StateResponse:
        container, process = self._process(request.id, request.exec_id)
        response = task.StateResponse(
            id=container.id,
            bundle=str(container.bundle.path),
            pid=container.sandbox.pid,
            status=process.status,
            stdin=process.stdin,
            stdout=process.stdout,
            stderr=process.stderr,
            terminal=process.terminal,
            exit_status=process.exit_status,
            exec_id=process.exec_id,
        )
        if process.exited_at is not None:
            response.exited_at.CopyFrom(process.exited_at)
        return response

    async def Pids(self, request: task.PidsRequest, ctx: CallContext) -> task.PidsResponse:
        container = self._container(request.id)
        # Guest pids mean nothing on the host: the VM's pid stands for every process,
        # and execs carry their id as runc's shim gives it.
        pid = container.sandbox.pid
        processes = [types.ProcessInfo(pid=pid)]
        for exec_id, process in container.execs.items():
            if process.status == types.RUNNING:
                details = process_pb2.ProcessDetails(exec_id=exec_id)
                info = any_pb2.Any(
                    type_url=details.DESCRIPTOR.full_name, value=details.SerializeToString()
                )
                processes.append(types.ProcessInfo(pid=pid, info=info))
        return task.PidsResponse(processes=processes)

    async def Connect(self, request: task.ConnectRequest, ctx: CallContext) -> task.ConnectResponse:
        pid = self.container.sandbox.pid if self.container else 0
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=pid)

    async def Shutdown(self, request: task.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        if self.container is None or request.now:
            # Answer first, then go: containerd waits for this response.
            asyncio.get_running_loop().call_later(0.01, self.on_shutdown)
        return EMPTY

    async def CloseIO(self, request: task.CloseIORequest, ctx: CallContext) -> empty_pb2.Empty:
        container, process = self._process(request.id, request.exec_id)
        if not request.stdin or process.stdin_forwarder is None:
            return EMPTY
        # What the client wrote before asking is forwarded first, then the EOF.
        process.stdin_forwarder.close()
        if process.stdin_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.stdin_task), STDIN_DRAIN_S)
        if process.status != types.STOPPED:
            with contextlib.suppress(TtrpcError):
                await container.agent.close_stdin(process.guest_id)
        return EMPTY

    async def ResizePty(self, request: task.ResizePtyRequest, ctx: CallContext) -> empty_pb2.Empty:
        container, process = self._process(request.id, request.exec_id)
        if process.terminal and process.status == types.RUNNING:
            with contextlib.suppress(TtrpcError):
                await container.agent.resize_terminal(
                    process.guest_id, request.width, request.height
                )
        return EMPTY  # without a terminal: a no-op, as for runc

    async def Pause(self, request: task.PauseRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(request.id)
        if container.init.status != types.RUNNING:
            raise FailedPrecondition(f"cannot pause container {request.id!r}: it is not running")
        vm = container.sandbox.vm
        assert vm is not None
        try:
            await vm.freeze()  # the whole VM stops: every process of the container
        except VMError as error:
            raise FailedPrecondition(f"cannot pause container {request.id!r}: {error}") from None
        container.init.status = types.PAUSED
        self.publisher.publish("/tasks/paused", events.TaskPaused(container_id=container.id))
        return EMPTY

    async def Resume(self, request: task.ResumeRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(request.id)
        if container.init.status != types.PAUSED:
            raise FailedPrecondition(f"cannot resume container {request.id!r}: it is not paused")
        vm = container.sandbox.vm
        assert vm is not None
        await vm.thaw()
        container.init.status = types.RUNNING
        self.publisher.publish("/tasks/resumed", events.TaskResumed(container_id=container.id))
        return EMPTY

    async def Checkpoint(
        self, request: task.CheckpointTaskRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        raise Unimplemented("checkpoint is not supported by harpoon: a VM is not a CRIU image")

    async def Update(self, request: task.UpdateTaskRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(request.id)
        try:
            resources = json.loads(request.resources.value or b"{}")
        except ValueError as error:
            raise InvalidArgument(f"the resources are not JSON: {error}") from None
        if not isinstance(resources, dict):
            raise InvalidArgument("the resources are not a JSON object")
        limits = cgroup_limits(resources, container.sandbox.config.memory_mib)
        await container.agent.update_resources(limits)
        return EMPTY

    async def Stats(self, request: task.StatsRequest, ctx: CallContext) -> task.StatsResponse:
        container = self._container(request.id)
        metrics = (await container.agent.stats()).metrics
        # The cgroup's figures from inside the guest, as runc reports its cgroup's.
        return task.StatsResponse(
            stats=any_pb2.Any(
                type_url=metrics.DESCRIPTOR.full_name, value=metrics.SerializeToString()
            )
        )

    async def close(self) -> None:
        """Tears down whatever is left (the daemon is exiting)."""
        await self.sandboxes.close()
        if self.container is not None:
            with contextlib.suppress(Exception):
                await self._teardown(self.container)
            self.container = None
