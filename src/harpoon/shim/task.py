"""The containerd Task service (containerd.task.v2.Task and v3.Task): one container,
its VM, and its init process, with runc's shim as the behavioural reference.

Lifecycle of the init process: created (VM booted, process prepared in the guest) →
running (Start) → stopped (its exit recorded, TaskExit published) → deleted (VM torn
down, TaskDelete published). Events go through one ordered publisher, so containerd
sees create → start → exit → delete. Methods not yet implemented answer
Unimplemented with a message saying so; they never pretend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.events import task_pb2 as events
from harpoon.api.containerd.task.v2 import shim_pb2 as task
from harpoon.api.containerd.types import task_pb2 as types
from harpoon.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unimplemented,
)
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim import paths
from harpoon.shim.bundle import Bundle, mount_rootfs, unmount_rootfs
from harpoon.shim.events import EventPublisher
from harpoon.shim.stdio import ProcessIO, pump
from harpoon.ttrpc.server import CallContext
from harpoon.ttrpc.status import TtrpcError
from harpoon.vmm.base import Share, VMConfig

GUEST_ROOTFS = "/run/harpoon/rootfs"
NINEP_OPTIONS = ["trans=virtio", "version=9p2000.L", "msize=524288"]
VM_DIED_EXIT_STATUS = 255
EMPTY = empty_pb2.Empty()

log = logging.getLogger(__name__)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


@dataclass
class InitProcess:
    """The host's record of the container's first process."""

    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    io: ProcessIO
    status: types.Status = types.CREATED
    guest_pid: int = 0
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    waiter: asyncio.Task[None] | None = None


@dataclass
class Container:
    id: str
    bundle: Bundle
    sandbox: Sandbox
    init: InitProcess
    rootfs_mounted: bool


def _spec_user(process: dict[str, Any]) -> tuple[int, int, list[int]]:
    user = process.get("user") or {}
    return (
        int(user.get("uid", 0)),
        int(user.get("gid", 0)),
        [int(g) for g in user.get("additionalGids") or []],
    )


class TaskService:
    def __init__(
        self,
        namespace: str,
        publisher: EventPublisher,
        make_vm: Callable[[VMConfig], Any],
        find_image: Callable[[], Any],
        on_shutdown: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.make_vm = make_vm
        self.find_image = find_image
        self.on_shutdown = on_shutdown
        self.container: Container | None = None

    # -- helpers -------------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        if self.container is None or self.container.id != container_id:
            raise NotFound(f"container {container_id!r} not created")
        return self.container

    def _init(self, container_id: str, exec_id: str) -> tuple[Container, InitProcess]:
        container = self._container(container_id)
        if exec_id:
            raise NotFound(f"process {exec_id!r} does not exist: exec is not supported yet")
        return container, container.init

    # -- Task methods ----------------------------------------------------------------

    async def Create(
        self, request: task.CreateTaskRequest, ctx: CallContext
    ) -> task.CreateTaskResponse:
        if self.container is not None:
            raise AlreadyExists(f"container {self.container.id!r} already exists in this shim")
        if request.checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported by harpoon")
        if request.terminal:
            raise Unimplemented("terminals (-t) are not supported by harpoon yet")
        bundle = Bundle.load(request.bundle)
        try:
            image = self.find_image()
        except Exception as error:
            raise FailedPrecondition(f"no guest image: {error}") from None
        rootfs = bundle.path / "rootfs" if request.rootfs else bundle.rootfs
        state_dir = paths.vm_state_dir(self.namespace, request.id)
        io = ProcessIO.open(request.stdout, request.stderr)
        sandbox: Sandbox | None = None
        mounted = False
        try:
            if request.rootfs:
                mount_rootfs(rootfs, list(request.rootfs))
                mounted = True
            elif not rootfs.is_dir():
                raise FailedPrecondition(f"the rootfs {rootfs} is not a directory")
            config = VMConfig(
                name=request.id,
                arch=image.arch,
                kernel=image.kernel,
                initrd=image.initrd,
                state_dir=state_dir,
                shares=(Share("rootfs", rootfs, read_only=bundle.readonly_root),),
            )
            sandbox = Sandbox(config, self.make_vm)
            await sandbox.start()
            agent = sandbox.agent
            assert agent is not None
            await agent.mount("rootfs", GUEST_ROOTFS, "9p", NINEP_OPTIONS)
            process = bundle.process
            uid, gid, groups = _spec_user(process)
            await agent.create_process(
                agent_pb2.CreateProcessRequest(
                    id=request.id,
                    args=process["args"],
                    env=process.get("env") or [],
                    cwd=process.get("cwd") or "/",
                    root=GUEST_ROOTFS,
                    uid=uid,
                    gid=gid,
                    additional_gids=groups,
                    hostname=bundle.hostname,
                    stdout=io.stdout is not None,
                    stderr=io.stderr is not None,
                    container_init=True,
                )
            )
        except BaseException:
            if sandbox is not None:
                await sandbox.stop()
            io.close()
            if mounted:
                unmount_rootfs(rootfs)
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        init = InitProcess(request.stdin, request.stdout, request.stderr, request.terminal, io)
        for stream, fd in ((agent_pb2.STDOUT, io.stdout), (agent_pb2.STDERR, io.stderr)):
            if fd is not None:
                init.pumps.append(
                    asyncio.ensure_future(pump(agent.read_output(request.id, stream), fd))
                )
        self.container = Container(request.id, bundle, sandbox, init, mounted)
        log.info(
            "created %s: VM pid %d booted in %.2f s", request.id, sandbox.pid, sandbox.boot_seconds
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
        container, init = self._init(request.id, request.exec_id)
        if init.status != types.CREATED:
            raise FailedPrecondition(f"container {request.id!r} has already been started")
        agent = container.sandbox.agent
        assert agent is not None
        init.guest_pid = await agent.start_process(request.id)
        init.status = types.RUNNING
        pid = container.sandbox.pid
        # Published before the waiter can publish the exit, however fast the process.
        self.publisher.publish("/tasks/start", events.TaskStart(container_id=request.id, pid=pid))
        init.waiter = asyncio.ensure_future(self._wait_init(container))
        return task.StartResponse(pid=pid)

    async def _wait_init(self, container: Container) -> None:
        init = container.init
        agent = container.sandbox.agent
        assert agent is not None
        try:
            response = await agent.wait_process(container.id)
            status, exited_at = response.exit_status, response.exited_at
        except (TtrpcError, OSError) as error:
            log.error("lost the VM of %s: %s", container.id, error)
            status, exited_at = VM_DIED_EXIT_STATUS, _now()
        # Every byte reaches containerd's FIFOs before anyone hears of the exit.
        await asyncio.gather(*init.pumps, return_exceptions=True)
        init.io.close()
        self._record_exit(container, status, exited_at)

    def _record_exit(
        self, container: Container, status: int, exited_at: timestamp_pb2.Timestamp
    ) -> None:
        init = container.init
        init.exit_status, init.exited_at, init.status = status, exited_at, types.STOPPED
        self.publisher.publish(
            "/tasks/exit",
            events.TaskExit(
                container_id=container.id,
                id=container.id,
                pid=container.sandbox.pid,
                exit_status=status,
                exited_at=exited_at,
            ),
        )
        init.exited.set()

    async def Delete(self, request: task.DeleteRequest, ctx: CallContext) -> task.DeleteResponse:
        container, init = self._init(request.id, request.exec_id)
        if init.status == types.RUNNING:
            raise FailedPrecondition(f"cannot delete container {request.id!r}: it is still running")
        pid = container.sandbox.pid
        await self._teardown(container)
        exited_at = init.exited_at or _now()
        self.publisher.publish(
            "/tasks/delete",
            events.TaskDelete(
                container_id=container.id,
                pid=pid,
                exit_status=init.exit_status,
                exited_at=exited_at,
            ),
        )
        self.container = None
        return task.DeleteResponse(pid=pid, exit_status=init.exit_status, exited_at=exited_at)

    async def _teardown(self, container: Container) -> None:
        init = container.init
        if init.waiter is not None and not init.waiter.done():
            init.waiter.cancel()
        for pumping in init.pumps:
            pumping.cancel()
        await container.sandbox.stop()
        init.io.close()
        if container.rootfs_mounted:
            unmount_rootfs(container.bundle.path / "rootfs")
        shutil.rmtree(container.sandbox.config.state_dir, ignore_errors=True)

    async def Kill(self, request: task.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        container, init = self._init(request.id, request.exec_id)
        if init.status == types.STOPPED:
            raise NotFound(f"process {request.id!r} already finished")
        if init.status == types.CREATED:
            # Nothing runs in the guest yet: the process dies before it ever starts.
            self._record_exit(container, 128 + request.signal, _now())
            return EMPTY
        agent = container.sandbox.agent
        assert agent is not None
        try:
            await agent.signal_process(request.id, request.signal, request.all)
        except TtrpcError as error:
            if init.status == types.STOPPED or error.code.name == "NOT_FOUND":
                raise NotFound(f"process {request.id!r} already finished") from None
            raise
        return EMPTY

    async def Wait(self, request: task.WaitRequest, ctx: CallContext) -> task.WaitResponse:
        _, init = self._init(request.id, request.exec_id)
        await init.exited.wait()
        return task.WaitResponse(exit_status=init.exit_status, exited_at=init.exited_at)

    async def State(self, request: task.StateRequest, ctx: CallContext) -> task.StateResponse:
        container, init = self._init(request.id, request.exec_id)
        response = task.StateResponse(
            id=container.id,
            bundle=str(container.bundle.path),
            pid=container.sandbox.pid,
            status=init.status,
            stdin=init.stdin,
            stdout=init.stdout,
            stderr=init.stderr,
            terminal=init.terminal,
            exit_status=init.exit_status,
        )
        if init.exited_at is not None:
            response.exited_at.CopyFrom(init.exited_at)
        return response

    async def Pids(self, request: task.PidsRequest, ctx: CallContext) -> task.PidsResponse:
        container = self._container(request.id)
        # Guest pids mean nothing on the host: the VM's pid stands for the container.
        return task.PidsResponse(processes=[types.ProcessInfo(pid=container.sandbox.pid)])

    async def Connect(self, request: task.ConnectRequest, ctx: CallContext) -> task.ConnectResponse:
        pid = self.container.sandbox.pid if self.container else 0
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=pid)

    async def Shutdown(self, request: task.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        if self.container is None or request.now:
            # Answer first, then go: containerd waits for this response.
            asyncio.get_running_loop().call_later(0.01, self.on_shutdown)
        return EMPTY

    async def CloseIO(self, request: task.CloseIORequest, ctx: CallContext) -> empty_pb2.Empty:
        self._init(request.id, request.exec_id)
        return EMPTY  # stdin is not forwarded yet, so the process already reads EOF

    async def ResizePty(self, request: task.ResizePtyRequest, ctx: CallContext) -> empty_pb2.Empty:
        self._init(request.id, request.exec_id)
        return EMPTY  # no terminal: a no-op, as for runc

    async def Exec(self, request: task.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        self._container(request.id)
        raise Unimplemented("exec is not supported by harpoon yet")

    async def Pause(self, request: task.PauseRequest, ctx: CallContext) -> empty_pb2.Empty:
        raise Unimplemented("pause is not supported by harpoon yet")

    async def Resume(self, request: task.ResumeRequest, ctx: CallContext) -> empty_pb2.Empty:
        raise Unimplemented("resume is not supported by harpoon yet")

    async def Checkpoint(
        self, request: task.CheckpointTaskRequest, ctx: CallContext
    ) -> empty_pb2.Empty:
        raise Unimplemented(
            "checkpoint is not supported by harpoon: a VM's state is not a CRIU image"
        )

    async def Update(self, request: task.UpdateTaskRequest, ctx: CallContext) -> empty_pb2.Empty:
        raise Unimplemented("update is not supported by harpoon yet")

    async def Stats(self, request: task.StatsRequest, ctx: CallContext) -> task.StatsResponse:
        raise Unimplemented("stats are not supported by harpoon yet")

    async def close(self) -> None:
        """Tears down whatever is left (the daemon is exiting)."""
        if self.container is not None:
            with contextlib.suppress(Exception):
                await self._teardown(self.container)
            self.container = None
