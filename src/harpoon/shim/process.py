"""One process of a container as the shim sees it: its init or an exec.

A Process has an explicit state (ProcessState: created → running ⇄ paused → stopped
→ deleted, as runc's shim has), owns the host ends of its stdio (containerd's FIFOs,
files or logger), the tasks that pump its output and forward its stdin, and the task
that follows it to its exit; `close()` ends all of them, once. It knows the agent and
nothing of containerd's events: the container (harpoon.shim.container) publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.types import task_pb2 as types
from harpoon.errdefs import FailedPrecondition
from harpoon.sandbox.agent_client import AgentClient
from harpoon.shim.stdio import ProcessIO, StdinForwarder, open_stdin, pump
from harpoon.ttrpc.status import ConnectionClosedError, TtrpcError

# How long an exit waits for its output to reach the client before it is reported.
OUTPUT_FLUSH_WAIT_S = 2.0
# How long CloseIO waits for buffered stdin to reach the guest before the EOF.
STDIN_DRAIN_S = 10.0
EXEC_FAILED_EXIT_STATUS = 127
# A process whose VM died under it: how it ended is unknown, as containerd reports a
# task whose shim died.
VM_DIED_EXIT_STATUS = 255

log = logging.getLogger(__name__)


class ProcessState(enum.Enum):
    CREATED = types.CREATED
    RUNNING = types.RUNNING
    PAUSED = types.PAUSED
    STOPPED = types.STOPPED
    DELETED = types.UNKNOWN  # gone: no request finds it any more


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


@dataclass(frozen=True)
class ProcessIOPaths:
    """Where containerd wants the process's stdio (FIFO paths or logger URIs)."""

    stdin: str
    stdout: str
    stderr: str
    terminal: bool


class Process:
    def __init__(
        self,
        exec_id: str,
        guest_id: str,
        spec: dict[str, Any],
        paths: ProcessIOPaths,
        io: ProcessIO,
    ) -> None:
        self.exec_id = exec_id  # "" for the container's init
        self.guest_id = guest_id  # the process's id in the agent
        self.spec = spec  # the OCI process
        self.paths = paths
        self.io = io
        self.state = ProcessState.CREATED
        self.exit_status = 0
        self.exited_at: timestamp_pb2.Timestamp | None = None
        self.exited = asyncio.Event()
        self.follower: asyncio.Task[None] | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stdin_fd: int | None = None
        self._stdin: StdinForwarder | None = None
        self._stdin_task: asyncio.Task[None] | None = None
        self._closed = False

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task this process owns: close() ends it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def status(self) -> types.Status:
        """containerd's word for the state."""
        status: types.Status = self.state.value
        return status

    # -- created ---------------------------------------------------------------------

    async def create(
        self,
        agent: AgentClient,
        request: agent_pb2.CreateProcessRequest,
        before_output: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Creates the process in the guest and connects its stdio to containerd's;
        each chunk of output waits for before_output, if given."""
        await agent.create_process(request)
        streams = ((agent_pb2.STDOUT, self.io.stdout), (agent_pb2.STDERR, self.io.stderr))
        for stream, fd in streams:
            if fd is not None and not (self.paths.terminal and stream == agent_pb2.STDERR):
                output = agent.read_output(self.guest_id, stream)
                self._pumps.append(self._spawn(pump(output, fd, before_output)))
        if self.paths.stdin:
            self._stdin_fd = open_stdin(self.paths.stdin)
            self._stdin = StdinForwarder(self._stdin_fd)
            self._stdin_task = self._spawn(self._forward_stdin(agent, self._stdin))

    async def _forward_stdin(self, agent: AgentClient, forwarder: StdinForwarder) -> None:
        try:
            await agent.write_stdin(self.guest_id, forwarder.chunks())
        except (TtrpcError, OSError) as error:
            # The process exited (or closed its stdin) before reading all of it.
            log.debug("stdin of %s ended: %s", self.guest_id, error)

    async def start(self, agent: AgentClient) -> None:
        if self.state is not ProcessState.CREATED:
            raise FailedPrecondition(f"process {self.guest_id!r} has already been started")
        try:
            await agent.start_process(self.guest_id)
        except TtrpcError as error:
            # It never ran: stopped, so that a client can delete it (runc's exit 127
            # for a process that could not be exec'd), or gone with its VM.
            self.io.close()
            self._release_stdin()
            lost = isinstance(error, ConnectionClosedError)
            self.stop(VM_DIED_EXIT_STATUS if lost else EXEC_FAILED_EXIT_STATUS, now())
            raise
        self.state = ProcessState.RUNNING

    # -- running ---------------------------------------------------------------------

    def follow(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs work (the container's follow-up of this process to its exit) as ours."""
        self.follower = self._spawn(work)

    async def wait_exit(self, agent: AgentClient) -> agent_pb2.WaitProcessResponse | None:
        """The guest's word on how the process ended, once its output has reached the
        client (or not within OUTPUT_FLUSH_WAIT_S: nobody reads it); None when the VM is
        gone. Stdin is released and the output's ends close once drained."""
        try:
            response: agent_pb2.WaitProcessResponse | None = await agent.wait_process(self.guest_id)
        except (TtrpcError, OSError) as error:
            log.error("lost the VM of %s: %s", self.guest_id, error)
            response = None
        # Every byte reaches containerd's FIFOs before anyone hears of the exit, unless
        # nobody reads them: then the exit goes first (clients wait for EOF on their
        # FIFOs before they delete, and EOF comes when the pumps are done).
        pumps = [p for p in self._pumps if not p.done()]
        if pumps:
            await asyncio.wait(pumps, timeout=OUTPUT_FLUSH_WAIT_S)
        self._spawn(self._close_output_when_drained())
        self._release_stdin()
        return response

    async def _close_output_when_drained(self) -> None:
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self.io.close()  # EOF for the client

    async def close_stdin(self, agent: AgentClient) -> None:
        """CloseIO: what the client wrote before asking is forwarded first, then the EOF."""
        if self._stdin is None:
            return
        self._stdin.close()
        if self._stdin_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stdin_task), STDIN_DRAIN_S)
        if self.state is not ProcessState.STOPPED:
            with contextlib.suppress(TtrpcError):
                await agent.close_stdin(self.guest_id)

    # -- stopped and deleted ---------------------------------------------------------

    def stop(self, status: int, exited_at: timestamp_pb2.Timestamp) -> None:
        """Records the exit; whoever waits for it (Task.Wait) hears of it."""
        self.exit_status, self.exited_at = status, exited_at
        self.state = ProcessState.STOPPED
        self.exited.set()

    def _release_stdin(self) -> None:
        if self._stdin is not None:
            self._stdin.close()
        if self._stdin_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._stdin_fd)
            self._stdin_fd = None

    async def close(self) -> None:
        """Ends every task of the process and closes its stdio; idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        self.io.close()
        self._release_stdin()
        if tasks:
            await asyncio.wait(tasks)
        self.state = ProcessState.DELETED
