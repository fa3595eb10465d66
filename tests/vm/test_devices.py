"""The agent's device discovery (harpoon.agent.devices) in a real guest: a device already
there, a virtio-serial port hot-added (QMP device_add) after the agent was asked for
it, and a device that never comes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.names import AGENT_PORT_NAME
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.agent_client import AgentClient
from harpoon.ttrpc.status import Code, TtrpcError
from harpoon.vmm.qemu import QemuVM

if TYPE_CHECKING:
    from tests.vm.conftest import RunInGuest, StartedSandbox, StartSandbox

pytestmark = pytest.mark.vm

PORT = agent_pb2.WaitDeviceRequest.VIRTIO_PORT
HOT_PORT_NAME = "harpoon.test-hot-port"
# Long enough for the request to reach the agent and its first look in sysfs (TCG).
AGENT_ASKED_S = 1.0
WAIT_S = 60.0
NEVER_S = 1.0


@pytest.fixture(scope="module")
def started(guest: GuestImage, sandboxes: StartSandbox) -> Iterator[StartedSandbox]:
    with sandboxes(guest, "devices", templates=False) as started:
        yield started


def agent_of(started: StartedSandbox) -> AgentClient:
    assert started.sandbox.agent is not None
    return started.sandbox.agent


def test_a_port_already_there_is_answered_at_once(started: StartedSandbox) -> None:
    wait = agent_of(started).wait_device(PORT, AGENT_PORT_NAME, WAIT_S)
    assert started.loop.run_until_complete(wait).startswith("/dev/vport")


def test_the_agent_waits_for_a_port_hot_added_after_it_asked(
    started: StartedSandbox, guest_process: RunInGuest
) -> None:
    vm = started.sandbox.vm
    assert isinstance(vm, QemuVM)
    agent = agent_of(started)

    async def scenario() -> tuple[str, bytes]:
        waiting = asyncio.ensure_future(agent.wait_device(PORT, HOT_PORT_NAME, WAIT_S))
        await asyncio.sleep(AGENT_ASKED_S)
        assert not waiting.done(), "answered before the port existed"
        # The VM's own QMP connection: QEMU serves one client at a time.
        qmp = await vm._qmp()
        await qmp.execute("chardev-add", {"id": "hot", "backend": {"type": "null", "data": {}}})
        await qmp.execute(
            "device_add",
            {"driver": "virtserialport", "id": "hot-port", "chardev": "hot", "name": HOT_PORT_NAME},
        )
        path = await asyncio.wait_for(waiting, WAIT_S)
        # What the guest's sysfs says of the device answered.
        name = path.removeprefix("/dev/")
        status, out, err = await guest_process(
            agent, "port-name", "/bin/cat", f"/sys/class/virtio-ports/{name}/name"
        )
        assert status == 0, err
        return path, out

    path, name = started.loop.run_until_complete(asyncio.wait_for(scenario(), 2 * WAIT_S))
    assert path.startswith("/dev/vport"), path
    assert name == f"{HOT_PORT_NAME}\n".encode()


def test_a_device_that_never_comes_fails_after_its_timeout(started: StartedSandbox) -> None:
    began = time.monotonic()
    with pytest.raises(TtrpcError) as caught:
        started.loop.run_until_complete(
            agent_of(started).wait_device(PORT, "harpoon.never", NEVER_S)
        )
    # Timed by the guest's clock, which under TCG runs up to ~1/3 ahead of the host's.
    assert time.monotonic() - began >= NEVER_S / 2
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert "no virtio-port device with id 'harpoon.never' appeared in the guest within 1 s" in (
        caught.value.message
    )
