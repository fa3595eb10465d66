"""What the VM tests share: the guest image, and running a process in the guest's own
root through the agent, as the tests (not containerd) do."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.agent_client import AgentClient
from harpoon.vmm.qemu_launch import host_arch

RunInGuest = Callable[..., Awaitable[tuple[int, bytes, bytes]]]


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    from harpoon.guest import find_guest

    try:
        return find_guest(host_arch())
    except Exception as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no guest image: {error}")


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def run_in_guest(agent: AgentClient, process_id: str, *args: str) -> tuple[int, bytes, bytes]:
    """Runs args (no OCI spec: in the guest's root) to its exit: status, stdout, stderr."""
    await agent.create_process(
        agent_pb2.CreateProcessRequest(
            id=process_id, args=list(args), env=["PATH=/bin:/usr/bin"], stdout=True, stderr=True
        )
    )
    out = asyncio.ensure_future(collect(agent.read_output(process_id, agent_pb2.STDOUT)))
    err = asyncio.ensure_future(collect(agent.read_output(process_id, agent_pb2.STDERR)))
    await agent.start_process(process_id)
    status = await agent.wait_process(process_id)
    await agent.delete_process(process_id)
    return status.exit_status, await out, await err


@pytest.fixture(scope="session")
def guest_process() -> RunInGuest:
    """run_in_guest, for test modules (conftest is not imported by name)."""
    return run_in_guest
