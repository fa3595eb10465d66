"""The agent's Shutdown in a real VM: the host gets its answer, then the guest powers off
by itself (ordered by the answer having been written, not by a timer)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from harpoon.guest.cache import GuestImage

if TYPE_CHECKING:
    from tests.vm.conftest import StartSandbox

pytestmark = pytest.mark.vm

POWER_OFF_WAIT_S = 60.0


def test_shutdown_is_answered_then_the_guest_powers_off(
    guest: GuestImage, sandboxes: StartSandbox
) -> None:
    with sandboxes(guest, "shutdown", templates=False) as started:
        agent, vm = started.sandbox.agent, started.sandbox.vm
        assert agent is not None and vm is not None

        async def shut_down() -> int:
            await agent.shutdown()  # answered: it raises if the guest went first
            return await asyncio.wait_for(vm.wait(), POWER_OFF_WAIT_S)

        # QEMU runs with -no-reboot: the guest powering off ends it, with status 0.
        assert started.loop.run_until_complete(shut_down()) == 0
