"""harpoon.shim.v1.Guest: harpoon's own service on the shim's socket, beside
containerd's Task service, for what a VM per container answers and containerd's API has
no call for (`harpoon top`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.shim.v1 import guest_pb2

if TYPE_CHECKING:
    from harpoon.shim.task import TaskService
    from harpoon.ttrpc.server import CallContext


class GuestService:
    def __init__(self, tasks: TaskService) -> None:
        self.tasks = tasks

    async def ListProcesses(
        self, request: guest_pb2.ListProcessesRequest, ctx: CallContext
    ) -> agent_pb2.ListProcessesResponse:
        container = self.tasks.created(request.id)
        return await container.agent.list_processes()
