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
import signal as signals
from collections.abc import AsyncIterator

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.events import task_pb2 as events
from harpoon.errdefs import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.container_plan import ContainerPlan, encode
from harpoon.shim.events import EventPublisher
from harpoon.shim.hooks import HookFailed, HookPhase
from harpoon.shim.process import VM_DIED_EXIT_STATUS, Process, ProcessState, now
from harpoon.shim.transform import oci_hooks
from harpoon.shim.transform.host_policy import process_for_guest
from harpoon.ttrpc.status import Code, ConnectionClosedError, TtrpcError

INIT_GUEST_ID = "init"
EXEC_GUEST_PREFIX = "exec:"
# How long the init's exit waits for its execs' exits to be published first.
EXEC_EXIT_WAIT_S = 10.0
# How long a SIGKILL for the container waits for the guest to answer before the shim
# kills the VM instead (a hung guest: its vCPUs stopped). Either way every process of
# the container dies, so the only cost of a slow guest taken for a hung one is the
# VM's end coming sooner.
KILL_ANSWER_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def answered_by(sandbox: Sandbox, container_id: str, doing: str) -> AsyncIterator[None]:
    """A step that needs the guest; one the VM did not live to answer fails with how
    the VM ended (Unavailable), not with the words of a broken connection."""
    try:
        yield
    except ConnectionClosedError:
        how = await sandbox.how_it_ended()
        raise Unavailable(f"the VM of container {container_id!r} {how} while {doing}") from None


def _finished(process: Process) -> bool:
    return process.state in (ProcessState.STOPPED, ProcessState.DELETED)


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
        self.killed_vm = False
        """Set once the shim killed the VM to deliver a SIGKILL the guest did not answer:
        every process then ended by SIGKILL."""

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
        async with answered_by(self.sandbox, self.id, f"creating exec {process.exec_id!r}"):
            await process.create(
                self.agent, self.create_request(process), self.sandbox.published_before_output
            )
        self.execs[process.exec_id] = process
        self.publisher.publish(
            "/tasks/exec-added",
            events.TaskExecAdded(container_id=self.id, exec_id=process.exec_id),
        )

    async def start(self, process: Process) -> int:
        try:
            async with answered_by(self.sandbox, self.id, f"starting {self._name(process)}"):
                await process.start(self.agent)
        except Unavailable:
            self.publish_exit(process)  # it is gone with its VM: nothing else will say so
            raise
        if process is self.init:
            await self._poststart()
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

    async def _poststart(self) -> None:
        """The spec's poststart hooks, once the init runs; if one fails the container is
        killed (its exit published as any) and Start fails, as under runc."""
        try:
            await oci_hooks.run_phase(
                self.id, self.bundle, self.pid, self.sandbox.config.netns, HookPhase.POSTSTART
            )
        except HookFailed:
            self.init.follow(self._follow(self.init))
            with contextlib.suppress(Exception):
                await self.agent.signal_process(self.init.guest_id, signals.SIGKILL, True)
            raise

    async def _follow(self, process: Process) -> None:
        """Follows a started process to its exit, then publishes it."""
        response = await process.wait_exit(self.agent)
        if response is None:
            ended_by = 128 + signals.SIGKILL if self.killed_vm else VM_DIED_EXIT_STATUS
            status, exited_at = ended_by, now()
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
        # How each process ended, for a shim log read after a failure (an exit status
        # of 0 or 128+n tells a process that ended itself from one killed).
        log.debug("%s of %s exited with status %d", self._name(process), self.id, status)
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
        if _finished(process):
            raise NotFound("process already finished")  # runc's words
        if self.init.state is ProcessState.PAUSED:
            # The guest's vCPUs are stopped: the agent could not deliver it until then.
            raise FailedPrecondition(f"container {self.id!r} is paused: resume it first")
        if process.state is ProcessState.CREATED:
            # Nothing runs in the guest yet: the process dies before it ever starts.
            process.stop(128 + signal, now())
            self.publish_exit(process)
            return
        # A SIGKILL for the container is delivered whatever the guest's state: if the
        # guest does not answer in time, the VM is killed, which kills as surely.
        container_kill = signal == signals.SIGKILL and process is self.init
        try:
            async with answered_by(self.sandbox, self.id, f"signalling {self._name(process)}"):
                await self.agent.signal_process(
                    process.guest_id,
                    signal,
                    all_processes and not process.exec_id,
                    **({"timeout": KILL_ANSWER_TIMEOUT_S} if container_kill else {}),
                )
        except (Unavailable, FailedPrecondition) as error:
            # The process ended and its container was deleted while the signal was on its
            # way (nerdctl forwards signals until its task is gone): runc's answer.
            if _finished(process):
                raise NotFound("process already finished") from None
            if not (container_kill and isinstance(error, Unavailable)):
                raise  # else the VM is gone, and the follower publishes how
        except TtrpcError as error:
            if error.code == Code.NOT_FOUND:
                raise NotFound("process already finished") from None
            if not (container_kill and error.code == Code.DEADLINE_EXCEEDED):
                raise
            log.warning("the guest of %s did not answer a SIGKILL within %.0f s: killing its VM",
                        self.id, KILL_ANSWER_TIMEOUT_S)  # fmt: skip
            self.killed_vm = True
            await self.sandbox.kill_vm()

    def _name(self, process: Process) -> str:
        return f"exec {process.exec_id!r}" if process.exec_id else "its init process"

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
