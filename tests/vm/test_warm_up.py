"""The agent's warm-up container (harpoon.agent.warm_up) in a real guest: created and
deleted after Hello when the guest is emulated and has a spare vCPU, leaving nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from harpoon.guest.cache import GuestImage

if TYPE_CHECKING:
    from tests.vm.conftest import StartedSandbox, StartSandbox

pytestmark = pytest.mark.vm

DONE = "warm-up container created and deleted"
WAIT_S = 60.0
LEFT_BEHIND = (
    "ls /run/crun /run/harpoon/bundles; "
    "test -e /sys/fs/cgroup/warm-up && echo cgroup left; "
    "test -e /run/harpoon/bundles/_warm-up && echo bundle left; true"
)


@pytest.fixture
def started(
    guest: GuestImage, sandboxes: StartSandbox, request: pytest.FixtureRequest
) -> Iterator[StartedSandbox]:
    """A sandbox with as many vCPUs as the test's parameter says, booted cold."""
    with sandboxes(guest, "warm-up", cpus=request.param, templates=False) as started:
        vm = started.sandbox.vm
        if not vm or not vm.emulated:
            pytest.skip("the warm-up only runs in emulated (TCG) guests")
        yield started


def shell(started: StartedSandbox, command: str) -> bytes:
    """The command's output; it runs in a guest container (conftest) whose id is "run"."""
    return started.run("/bin/sh", "-c", command)[1]


@pytest.mark.parametrize("started", [2], indirect=True)
def test_the_warm_up_container_runs_after_hello_and_leaves_nothing(started: StartedSandbox) -> None:
    deadline = time.monotonic() + WAIT_S
    while DONE not in started.console() and time.monotonic() < deadline:
        time.sleep(0.1)
    console = started.console()
    assert DONE in console, console
    assert "warm-up container failed" not in console
    # crun's state, the bundle and the cgroup are gone: only the shell's own are there.
    assert shell(started, LEFT_BEHIND) == b"/run/crun:\nrun\n\n/run/harpoon/bundles:\nrun\n"


@pytest.mark.parametrize("started", [1], indirect=True)
def test_a_guest_with_one_vcpu_does_not_warm_up(started: StartedSandbox) -> None:
    """It would only take the vCPU from the real container's create."""
    listing = shell(started, LEFT_BEHIND + "; ls /var/lib/harpoon")
    assert b"_warm-up" not in listing
    assert b"warm-up-root" not in listing
    assert DONE not in started.console()
