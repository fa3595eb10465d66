"""What the VM tests share: the guest image, a sandbox started as the shim starts one,
and running a process in the guest's own root through the agent, as the tests (not
containerd) do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.plan import plan_launch
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.bundle import Bundle
from harpoon.shim.container_plan import plan_container
from harpoon.vmm.backend import QemuBackend, host_arch

RunInGuest = Callable[..., Awaitable[tuple[int, bytes, bytes]]]
StartSandbox = Callable[..., contextlib.AbstractContextManager["StartedSandbox"]]
RUN_TIMEOUT_S = 120.0


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


class StartedSandbox:
    """A started sandbox, and the loop that drives it from synchronous tests."""

    def __init__(self, sandbox: Sandbox, loop: asyncio.AbstractEventLoop) -> None:
        self.sandbox, self.loop = sandbox, loop

    def run(self, *args: str) -> tuple[int, bytes, bytes]:
        """run_in_guest, to the process's exit."""
        assert self.sandbox.agent is not None
        running = run_in_guest(self.sandbox.agent, "run", *args)
        return self.loop.run_until_complete(asyncio.wait_for(running, RUN_TIMEOUT_S))

    def console(self) -> str:
        assert self.sandbox.vm is not None
        return self.sandbox.vm.console_tail()


@contextlib.contextmanager
def start_sandbox(
    guest: GuestImage,
    name: str,
    *,
    cpus: int | None = None,
    templates: Literal[False] | None = None,
) -> Iterator[StartedSandbox]:
    """A container's sandbox as the shim plans it (harpoon.shim.container_plan: a rootfs
    share), from a VM template unless templates is False; stopped, its state directory
    removed, on the way out."""
    loop = asyncio.new_event_loop()
    backend = QemuBackend()
    container_id = f"{name}-{os.getpid()}-{time.time_ns()}"
    bundle = Bundle(Path("/nonexistent"), {"process": {"args": ["sh"]}})
    plan = plan_container("hp-test", container_id, bundle, guest, backend, templates).launch
    if cpus is not None:
        plan = plan_launch(replace(plan.config, cpus=cpus), backend, templates, plan.rootfs_share)
    config = plan.config
    sandbox = Sandbox(plan, backend)
    try:
        loop.run_until_complete(sandbox.start())
        yield StartedSandbox(sandbox, loop)
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def sandboxes() -> StartSandbox:
    """start_sandbox, for test modules (conftest is not imported by name)."""
    return start_sandbox
