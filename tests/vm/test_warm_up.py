"""The agent's warm-up container (harpoon.agent.warm_up) in a real guest: created and
deleted after Hello when the guest is emulated and has a spare vCPU, leaving nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from harpoon.guest.cache import GuestImage
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.prestart import rootfs_share, vm_config
from harpoon.shim.resources import vm_size
from harpoon.vmm.qemu import QemuVM

if TYPE_CHECKING:
    from tests.vm.conftest import RunInGuest

pytestmark = pytest.mark.vm

DONE = "warm-up container created and deleted"
WAIT_S = 60.0
LEFT_BEHIND = (
    "ls /run/crun /run/harpoon/bundles; "
    "test -e /sys/fs/cgroup/warm-up && echo cgroup left; "
    "test -e /run/harpoon/bundles/_warm-up && echo bundle left; true"
)


class Started:
    def __init__(self, sandbox: Sandbox, loop: asyncio.AbstractEventLoop, run: RunInGuest) -> None:
        self.sandbox, self.loop, self._run = sandbox, loop, run

    def console(self) -> str:
        assert self.sandbox.vm is not None
        return self.sandbox.vm.console_tail()

    def shell(self, command: str) -> bytes:
        running = self._run(self.sandbox.agent, "look", "/bin/sh", "-c", command)
        return self.loop.run_until_complete(asyncio.wait_for(running, WAIT_S))[1]


@pytest.fixture
def started(
    guest: GuestImage, guest_process: RunInGuest, request: pytest.FixtureRequest
) -> Iterator[Started]:
    """A sandbox with as many vCPUs as the test's parameter says, booted cold."""
    loop = asyncio.new_event_loop()
    name = f"warm-up-{os.getpid()}-{time.time_ns()}"
    config = replace(vm_config("hp-test", name, guest, vm_size({})), cpus=request.param)
    sandbox = Sandbox(config, QemuVM, False, rootfs_share=rootfs_share(config))
    try:
        loop.run_until_complete(sandbox.start())
        if not sandbox.vm or not sandbox.vm.emulated:
            pytest.skip("the warm-up only runs in emulated (TCG) guests")
        yield Started(sandbox, loop, guest_process)
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)


@pytest.mark.parametrize("started", [2], indirect=True)
def test_the_warm_up_container_runs_after_hello_and_leaves_nothing(started: Started) -> None:
    deadline = time.monotonic() + WAIT_S
    while DONE not in started.console() and time.monotonic() < deadline:
        time.sleep(0.1)
    console = started.console()
    assert DONE in console, console
    assert "warm-up container failed" not in console
    # crun's state, the bundle and the cgroup are gone.
    assert started.shell(LEFT_BEHIND) == b"/run/crun:\n\n/run/harpoon/bundles:\n"


@pytest.mark.parametrize("started", [1], indirect=True)
def test_a_guest_with_one_vcpu_does_not_warm_up(started: Started) -> None:
    """It would only take the vCPU from the real container's create."""
    listing = started.shell(LEFT_BEHIND + "; ls /var/lib/harpoon")
    assert b"_warm-up" not in listing
    assert b"warm-up-root" not in listing
    assert DONE not in started.console()
