"""The containerd Task service (containerd.task.v2.Task and v3.Task): one container,
its VM, its init process and its execs, with runc's shim as the behavioural reference.

Thin on purpose: each method finds the container and process it names and asks them
(harpoon.shim.container, harpoon.shim.process). Create runs the container's plan
(harpoon.shim.container_plan) through the transformers of its pipeline
(harpoon.shim.transform) on an AsyncExitStack, which is rolled back whole when a step
fails and becomes the container's teardown when all succeed. Methods not implemented
answer Unimplemented with a message saying so; they never pretend.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2

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
from harpoon.sandbox.sandbox import SandboxStarter
from harpoon.shim.bundle import Bundle
from harpoon.shim.container import EXEC_GUEST_PREFIX, INIT_GUEST_ID, Container, answered_by
from harpoon.shim.container_plan import ContainerPlan, plan_container
from harpoon.shim.events import EventPublisher
from harpoon.shim.process import Process, ProcessIOPaths, ProcessState, now
from harpoon.shim.resources import cgroup_limits
from harpoon.shim.stdio import ProcessIO
from harpoon.shim.transform import PIPELINE
from harpoon.shim.transform.draft import CreateContext
from harpoon.shim.transform.guest_rootfs import needs_guest
from harpoon.ttrpc.server import CallContext
from harpoon.ttrpc.status import TtrpcError
from harpoon.vmm.base import VMError

EMPTY = empty_pb2.Empty()

log = logging.getLogger(__name__)


def _same_bundle(plan: ContainerPlan, request: task.CreateTaskRequest) -> bool:
    try:
        same_path = os.path.samefile(plan.bundle.path, request.bundle)
    except OSError:
        return False
    return plan.container_id == request.id and same_path


class TaskService:
    def __init__(
        self,
        namespace: str,
        publisher: EventPublisher,
        sandboxes: SandboxStarter,
        find_image: Callable[[], Any],
        on_shutdown: Callable[[], None],
        early_plan: ContainerPlan | None = None,
    ) -> None:
        """sandboxes: starts the container's VM, or hands over the one the daemon
        started ahead for early_plan (the plan it made from the bundle)."""
        self.namespace = namespace
        self.publisher = publisher
        self.sandboxes = sandboxes
        self.find_image = find_image
        self.on_shutdown = on_shutdown
        self._early_plan = early_plan
        self.container: Container | None = None
        self.deleted = False
        """Set once the container has been deleted: all this shim was for is done."""
        self._creating = False

    # -- lookups ---------------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        if self.container is None or self.container.id != container_id:
            raise NotFound(f"container {container_id!r} not created")
        return self.container

    def created(self, container_id: str) -> Container:
        """The container of that id (NotFound if this shim has none)."""
        return self._container(container_id)

    def _process(self, container_id: str, exec_id: str) -> tuple[Container, Process]:
        container = self._container(container_id)
        return container, container.process(exec_id)

    def _open_io(self, request: task.CreateTaskRequest | task.ExecProcessRequest) -> ProcessIO:
        """The host ends of a new process's output (a terminal has no stderr)."""
        return ProcessIO.open(
            request.stdout,
            "" if request.terminal else request.stderr,
            namespace=self.namespace,
            container_id=request.id,
        )

    def _plan(self, request: task.CreateTaskRequest) -> ContainerPlan:
        """The daemon's plan if it was made for this bundle, else a new one; raises (and
        launches nothing) for a spec harpoon cannot run. A rootfs the guest assembles
        (erofs layers as disks) is known only now: its VM is another than the one started
        ahead, which SandboxStarter then stops."""
        early, self._early_plan = self._early_plan, None
        guest_mounts = tuple(request.rootfs) if needs_guest(request.rootfs) else ()
        if early is not None and _same_bundle(early, request) and not guest_mounts:
            return early
        bundle = Bundle.load(request.bundle)
        try:
            image = self.find_image()
        except Exception as error:
            raise FailedPrecondition(f"no guest image: {error}") from None
        return plan_container(
            self.namespace,
            request.id,
            bundle,
            image,
            self.sandboxes.backend,
            rootfs_mounts=guest_mounts,
        )

    # -- Task methods ----------------------------------------------------------------

    async def Create(
        self, request: task.CreateTaskRequest, ctx: CallContext
    ) -> task.CreateTaskResponse:
        if self.container is not None:
            raise AlreadyExists(f"container {self.container.id!r} already exists in this shim")
        if request.checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported by harpoon")
        self._creating = True
        try:
            return await self._create(request)
        finally:
            self._creating = False

    async def _create(self, request: task.CreateTaskRequest) -> task.CreateTaskResponse:
        try:
            plan = self._plan(request)
        except BaseException:
            # Planned again at Create (an erofs rootfs) and refused: the VM started
            # ahead is of no use.
            await self.sandboxes.close()
            raise
        async with contextlib.AsyncExitStack() as undo:
            # Last out: a VM started ahead and not taken (this Create failed first) stops,
            # and its template stays; the VM's state directory goes.
            undo.push_async_callback(self.sandboxes.close)
            undo.callback(shutil.rmtree, plan.launch.config.state_dir, ignore_errors=True)
            io = self._open_io(request)
            undo.callback(io.close)
            create = CreateContext(
                request,
                plan.bundle,
                undo,
                rootfs=Path(),
                binds=plan.binds,
                bind_shares=plan.bind_shares,
                guest_rootfs=plan.guest_rootfs,
            )
            for transformer in PIPELINE:
                await transformer.before_vm(create)
            sandbox = await self.sandboxes.start(plan.launch)
            undo.push_async_callback(sandbox.stop)
            paths = ProcessIOPaths(request.stdin, request.stdout, request.stderr, request.terminal)
            init = Process("", INIT_GUEST_ID, plan.bundle.process, paths, io)
            undo.push_async_callback(init.close)
            container = Container(plan, sandbox, init, self.publisher, undo)
            async with answered_by(sandbox, request.id, "creating the container"):
                for transformer in PIPELINE:
                    await transformer.with_vm(create, sandbox)
                # Its output waits for what it listens on to be published (a VM that
                # shares the host's network: harpoon.sandbox.listeners).
                await init.create(
                    container.agent, container.create_request(init),
                    sandbox.published_before_output,
                )  # fmt: skip
                for transformer in PIPELINE:
                    await transformer.with_init(create, sandbox)
            container.undo = undo.pop_all()
        self.container = container
        log.info("created %s: VM pid %d started in %.2f s (%s)", request.id, sandbox.pid,
                 sandbox.boot_seconds, "restored" if sandbox.restored else "cold boot")  # fmt: skip
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
        return task.StartResponse(pid=await container.start(process))

    async def Exec(self, request: task.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(request.id)
        if not request.exec_id:
            raise InvalidArgument("exec needs an exec id")
        try:
            spec = json.loads(request.spec.value)
        except ValueError as error:
            raise InvalidArgument(f"the exec's process spec is not JSON: {error}") from None
        if not isinstance(spec, dict) or not spec.get("args"):
            raise InvalidArgument("the exec's process spec has no args")
        if request.exec_id in container.execs:
            raise AlreadyExists(f"id {request.exec_id}")
        paths = ProcessIOPaths(request.stdin, request.stdout, request.stderr, request.terminal)
        process = Process(
            request.exec_id,
            f"{EXEC_GUEST_PREFIX}{request.exec_id}",
            spec,
            paths,
            self._open_io(request),
        )
        try:
            await container.add_exec(process)
        except BaseException:
            await process.close()
            raise
        return EMPTY

    async def Delete(self, request: task.DeleteRequest, ctx: CallContext) -> task.DeleteResponse:
        container, process = self._process(request.id, request.exec_id)
        if process.state is ProcessState.RUNNING:
            raise FailedPrecondition(
                f"cannot delete process {process.exec_id or container.id!r}: it is still running"
            )
        exited_at = process.exited_at or now()
        response = task.DeleteResponse(
            pid=container.pid, exit_status=process.exit_status, exited_at=exited_at
        )
        if process.exec_id:
            await container.delete_exec(process)
            return response
        await container.teardown()
        self.publisher.publish(
            "/tasks/delete",
            events.TaskDelete(
                container_id=container.id,
                pid=response.pid,
                exit_status=process.exit_status,
                exited_at=exited_at,
            ),
        )
        self.container = None
        self.deleted = True
        return response

    async def Kill(self, request: task.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        container, process = self._process(request.id, request.exec_id)
        await container.kill(process, request.signal, request.all)
        return EMPTY

    async def Wait(self, request: task.WaitRequest, ctx: CallContext) -> task.WaitResponse:
        _, process = self._process(request.id, request.exec_id)
        await process.exited.wait()
        return task.WaitResponse(exit_status=process.exit_status, exited_at=process.exited_at)

    async def State(self, request: task.StateRequest, ctx: CallContext) -> task.StateResponse:
        container, process = self._process(request.id, request.exec_id)
        paths = process.paths
        response = task.StateResponse(
            id=container.id,
            bundle=str(container.bundle.path),
            pid=container.pid,
            status=process.status,
            stdin=paths.stdin,
            stdout=paths.stdout,
            stderr=paths.stderr,
            terminal=paths.terminal,
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
        processes = [types.ProcessInfo(pid=container.pid)]
        for exec_id, process in container.execs.items():
            if process.state is ProcessState.RUNNING:
                details = process_pb2.ProcessDetails(exec_id=exec_id)
                info = any_pb2.Any(
                    type_url=details.DESCRIPTOR.full_name, value=details.SerializeToString()
                )
                processes.append(types.ProcessInfo(pid=container.pid, info=info))
        return task.PidsResponse(processes=processes)

    async def Connect(self, request: task.ConnectRequest, ctx: CallContext) -> task.ConnectResponse:
        pid = self.container.pid if self.container else 0
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=pid)

    async def Shutdown(self, request: task.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        if self.container is None or request.now:
            # Answer first, then go: containerd waits for this response.
            ctx.after_reply(self.on_shutdown)
        return EMPTY

    async def CloseIO(self, request: task.CloseIORequest, ctx: CallContext) -> empty_pb2.Empty:
        container, process = self._process(request.id, request.exec_id)
        if request.stdin:
            await process.close_stdin(container.agent)
        return EMPTY

    async def ResizePty(self, request: task.ResizePtyRequest, ctx: CallContext) -> empty_pb2.Empty:
        container, process = self._process(request.id, request.exec_id)
        if process.paths.terminal and process.state is ProcessState.RUNNING:
            with contextlib.suppress(TtrpcError):
                await container.agent.resize_terminal(
                    process.guest_id, request.width, request.height
                )
        return EMPTY  # without a terminal: a no-op, as for runc

    async def Pause(self, request: task.PauseRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(request.id)
        if container.init.state is not ProcessState.RUNNING:
            raise FailedPrecondition(f"cannot pause container {request.id!r}: it is not running")
        vm = container.sandbox.vm
        assert vm is not None
        try:
            await vm.freeze()  # the whole VM stops: every process of the container
        except VMError as error:
            raise FailedPrecondition(f"cannot pause container {request.id!r}: {error}") from None
        container.init.state = ProcessState.PAUSED
        self.publisher.publish("/tasks/paused", events.TaskPaused(container_id=container.id))
        return EMPTY

    async def Resume(self, request: task.ResumeRequest, ctx: CallContext) -> empty_pb2.Empty:
        container = self._container(request.id)
        if container.init.state is not ProcessState.PAUSED:
            raise FailedPrecondition(f"cannot resume container {request.id!r}: it is not paused")
        vm = container.sandbox.vm
        assert vm is not None
        await vm.thaw()
        container.init.state = ProcessState.RUNNING
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

    def abandoned(self) -> bool:
        """Whether this shim has nothing left to do for anyone: its container deleted
        (a client that disconnects after that sends no Shutdown any more)."""
        return self.deleted and self.container is None

    def unused(self) -> bool:
        """Whether this shim holds no container and is making none: one long started
        and still unused was never sent its Create (containerd died in between)."""
        return self.container is None and not self._creating

    async def close(self) -> None:
        """Tears down whatever is left (the daemon is exiting)."""
        await self.sandboxes.close()
        if self.container is not None:
            with contextlib.suppress(Exception):
                await self.container.teardown()
            self.container = None
