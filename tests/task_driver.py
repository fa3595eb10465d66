"""The shim's Task service driven in-process as containerd drives it, one method at a
time: what tests/unit/test_shim_task.py (fake VMs) and tests/vm/test_shim_faults.py
(real QEMU, faults injected between and during the calls) share."""

from __future__ import annotations

import json
import os
import signal

from google.protobuf import any_pb2
from google.protobuf.message import Message

from harpoon.api.containerd.events import task_pb2 as events
from harpoon.api.containerd.task.v2 import shim_pb2 as task
from harpoon.api.containerd.types import mount_pb2
from harpoon.shim.events import EventPublisher
from harpoon.shim.task import TaskService
from harpoon.ttrpc.server import CallContext

NAMESPACE = "default"
ID = "c1"
SIGKILLED = 128 + signal.SIGKILL


class RecordingPublisher(EventPublisher):
    """containerd's side of the events: what was published, in order."""

    def __init__(self) -> None:
        super().__init__("", NAMESPACE)
        self.events: list[tuple[str, Message]] = []

    def publish(self, topic: str, event: Message) -> None:
        self.events.append((topic, event))

    @property
    def topics(self) -> list[str]:
        return [topic for topic, _ in self.events]

    def exits(self) -> list[tuple[str, int]]:
        return [
            (event.id, event.exit_status)
            for topic, event in self.events
            if isinstance(event, events.TaskExit)
        ]


def ctx(method: str) -> CallContext:
    return CallContext("containerd.task.v2.Task", method, {}, None)


class Shim:
    """The Task service as containerd calls it, one method at a time, for container ID."""

    def __init__(self, service: TaskService, exec_path: str = "/bin") -> None:
        self.service = service
        publisher = service.publisher
        assert isinstance(publisher, RecordingPublisher)
        self.publisher = publisher
        self.exec_env = [f"PATH={exec_path}"]

    async def create(
        self,
        bundle: os.PathLike[str] | str,
        stdout: str = "",
        stderr: str = "",
        rootfs: list[mount_pb2.Mount] | None = None,
    ) -> task.CreateTaskResponse:
        request = task.CreateTaskRequest(
            id=ID, bundle=str(bundle), stdout=stdout, stderr=stderr, rootfs=rootfs or []
        )
        return await self.service.Create(request, ctx("Create"))

    async def start(self, exec_id: str = "") -> task.StartResponse:
        return await self.service.Start(task.StartRequest(id=ID, exec_id=exec_id), ctx("Start"))

    async def exec(self, exec_id: str, args: list[str], stdout: str = "") -> None:
        process = {"args": args, "env": self.exec_env, "cwd": "/"}
        spec = any_pb2.Any(
            type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
            value=json.dumps(process).encode(),
        )
        request = task.ExecProcessRequest(id=ID, exec_id=exec_id, stdout=stdout, spec=spec)
        await self.service.Exec(request, ctx("Exec"))

    async def wait(self, exec_id: str = "") -> int:
        response = await self.service.Wait(task.WaitRequest(id=ID, exec_id=exec_id), ctx("Wait"))
        return response.exit_status

    async def kill(self, signum: int, exec_id: str = "", all: bool = False) -> None:
        request = task.KillRequest(id=ID, exec_id=exec_id, signal=signum, all=all)
        await self.service.Kill(request, ctx("Kill"))

    async def delete(self, exec_id: str = "") -> task.DeleteResponse:
        request = task.DeleteRequest(id=ID, exec_id=exec_id)
        return await self.service.Delete(request, ctx("Delete"))

    async def state(self, exec_id: str = "") -> task.StateResponse:
        return await self.service.State(task.StateRequest(id=ID, exec_id=exec_id), ctx("State"))

    async def status(self, exec_id: str = "") -> tuple[int, int]:
        """State's status and exit status."""
        state = await self.state(exec_id)
        return state.status, state.exit_status

    async def run_to_exit(self, bundle: os.PathLike[str] | str) -> int:
        """Create, Start, Wait, Delete: the exit status."""
        await self.create(bundle)
        await self.start()
        status = await self.wait()
        assert (await self.delete()).exit_status == status
        return status
