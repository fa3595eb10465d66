"""One container: its VM (a Sandbox), its init and its execs, and the order of its events.

Events go through one ordered publisher, so containerd sees create → start → exit →
delete; an exec's exit is published before the init's (the init's exit is the
container's last: execs die with it). Everything the container holds on the host was
pushed onto its `undo` stack by Create's pipeline (harpoon.shim.transform): closing it
is the container's teardown, in the reverse order of its making.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.events import task_pb2 as events
from harpoon.errdefs import AlreadyExists, FailedPrecondition, NotFound
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.container_plan import ContainerPlan, encode
from harpoon.shim.events import EventPublisher
from harpoon.shim.process import Process, ProcessState, now
from harpoon.shim.transform.host_policy import process_for_guest
from harpoon.ttrpc.status import Code, TtrpcError

INIT_GUEST_ID = "init"
EXEC_GUEST_PREFIX = "exec:"
# How long the init's exit waits for its execs' exits to be published first.
EXEC_EXIT_WAIT_S = 10.0
VM_DIED_EXIT_STATUS = 255

log = logging.getLogger(__name__)


class Container:
    def __init__(
        self,
        plan: ContainerPlan,
        sandbox: Sandbox,
        init: Process,
        publisher: EventPublisher,
        undo: contextlib.AsyncExitStack,
    ) -> None:
        self.plan = plan
        self.id = plan.container_id
        self.bundle = plan.bundle
        self.sandbox = sandbox
        self.init = init
        self.execs: dict[str, Process] = {}
        self.publisher = publisher
        self.undo = undo

    @property
    def agent(self) -> AgentClient:
        agent = self.sandbox.agent
        if agent is None:
            raise FailedPrecondition(f"the VM of container {self.id!r} is not running")
        return agent

    @property
    def pid(self) -> int:
        """The VMM's host pid: what containerd reports for every process (guest pids
        mean nothing on the host)."""
        return self.sandbox.pid

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"process {exec_id!r} does not exist in {self.id!r}") from None

    def create_request(self, process: Process) -> agent_pb2.CreateProcessRequest:
        """The agent's request for a process, which crun runs in the guest: the whole
        guest spec for the init, the OCI process for an exec."""
        init = process is self.init
        paths = process.paths
        return agent_pb2.CreateProcessRequest(
            id=process.guest_id,
            terminal=paths.terminal,
            stdin=bool(paths.stdin),
            stdout=process.io.stdout is not None,
            stderr=process.io.stderr is not None and not paths.terminal,
            container_init=init,
            oci_json=self.plan.guest_spec if init else encode(process_for_guest(process.spec)),
            container_id="" if init else INIT_GUEST_ID,
            # The guest's own name, for a container without a UTS namespace of its own:
            # the host's, as such a runc container would see.
            hostname=os.uname().nodename if init else "",
        )

    async def add_exec(self, process: Process) -> None:
        if process.exec_id in self.execs:
            raise AlreadyExists(f"id {process.exec_id}")
        if self.init.state is not ProcessState.RUNNING:
            raise FailedPrecondition(
                f"cannot exec in container {self.id!r}: its init process is not running"
            )
        await process.create(self.agent, self.create_request(process))
        self.execs[process.exec_id] = process
        self.publisher.publish(
            "/tasks/exec-added",
            events.TaskExecAdded(container_id=self.id, exec_id=process.exec_id),
        )

    async def start(self, process: Process) -> int:
        await process.start(self.agent)
        # Published before the follower can publish the exit, however fast the process.
        if process.exec_id:
            self.publisher.publish(
                "/tasks/exec-started",
                events.TaskExecStarted(container_id=self.id, exec_id=process.exec_id, pid=self.pid),
            )
        else:
            self.publisher.publish(
                "/tasks/start", events.TaskStart(container_id=self.id, pid=self.pid)
            )
        process.follow(self._follow(process))
        return self.pid

    async def _follow(self, process: Process) -> None:
        """Follows a started process to its exit, then publishes it."""
        response = await process.wait_exit(self.agent)
        if response is None:
            status, exited_at = VM_DIED_EXIT_STATUS, now()
        else:
            status, exited_at = response.exit_status, response.exited_at
            if response.oom_killed:
                self.publisher.publish("/tasks/oom", events.TaskOOM(container_id=self.id))
        if process is self.init:
            # The agent kills every process when the init exits: execs go first.
            followers = [e.follower for e in self.execs.values() if e.follower is not None]
            if followers:
                await asyncio.wait(followers, timeout=EXEC_EXIT_WAIT_S)
        process.stop(status, exited_at)
        self.publish_exit(process)

    def publish_exit(self, process: Process) -> None:
        self.publisher.publish(
            "/tasks/exit",
            events.TaskExit(
                container_id=self.id,
                id=process.exec_id or self.id,
                pid=self.pid,
                exit_status=process.exit_status,
                exited_at=process.exited_at,
            ),
        )

    async def kill(self, process: Process, signal: int, all_processes: bool) -> None:
        if process.state is ProcessState.STOPPED:
            raise NotFound("process already finished")  # runc's words
        if self.init.state is ProcessState.PAUSED:
            # The guest's vCPUs are stopped: the agent could not deliver it until then.
            raise FailedPrecondition(f"container {self.id!r} is paused: resume it first")
        if process.state is ProcessState.CREATED:
            # Nothing runs in the guest yet: the process dies before it ever starts.
            process.stop(128 + signal, now())
            self.publish_exit(process)
            return
        try:
            await self.agent.signal_process(
                process.guest_id, signal, all_processes and not process.exec_id
            )
        except TtrpcError as error:
            if error.code == Code.NOT_FOUND:
                raise NotFound("process already finished") from None
            raise

    async def delete_exec(self, process: Process) -> None:
        await process.close()
        with contextlib.suppress(TtrpcError):
            await self.agent.delete_process(process.guest_id)
        del self.execs[process.exec_id]

    async def teardown(self) -> None:
        """Ends every process, then undoes Create (VM, rootfs, stdio, state); idempotent."""
        for process in (*self.execs.values(), self.init):
            await process.close()
        await self.undo.aclose()
