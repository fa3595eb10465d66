"""The container's VM, planned from config.json and launched before Create comes.

containerd writes the bundle's config.json before it runs `shim start`, and then still
has to read start's answer, connect and send Create: the daemon plans the container at
once (harpoon.shim.container_plan) and launches the plan's VM, and Create runs that
same plan.

It starts in two steps. `launch` runs first thing in the daemon, before asyncio and
what serves containerd are loaded (~60 ms of imports): it plans, finds the VM template
that fits and launches the VMM (harpoon.sandbox.plan.launch_early), whose own start-up
(~25 ms) then overlaps those imports. `prestart` then has harpoon.sandbox.SandboxStarter
start the plan's sandbox, which takes that VMM. A bundle the plan refuses launches
nothing: Create plans again and reports the error. This module must import nothing
that loads asyncio or protobuf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harpoon.vmm.backend import Backend, default_backend

if TYPE_CHECKING:
    from harpoon.sandbox.sandbox import SandboxStarter
    from harpoon.shim.container_plan import ContainerPlan

# How long a VM started ahead waits for its Create before it is stopped.
EXPIRE_AFTER_S = 60.0

log = logging.getLogger(__name__)


@dataclass
class EarlyStart:
    """The daemon's backend, and the container's plan if the bundle gave one (its VMM
    launched already, unless that failed: the sandbox's start then launches it)."""

    backend: Backend
    plan: ContainerPlan | None


def launch(namespace: str, container_id: str, bundle_dir: str) -> EarlyStart:
    """The bundle's plan, with its VMM launched (no event loop needed)."""
    from harpoon.guest import find_guest
    from harpoon.sandbox.plan import launch_early
    from harpoon.shim.bundle import Bundle
    from harpoon.shim.container_plan import plan_container
    from harpoon.vmm.base import VMError

    backend = default_backend()
    try:
        image = find_guest(backend.host_arch())
        bundle = Bundle.load(bundle_dir)
        plan = plan_container(namespace, container_id, bundle, image, backend)
    except Exception as error:  # Create will report it, if it is an error at all
        log.info("not starting the VM of %s ahead: %s", container_id, error)
        return EarlyStart(backend, None)
    try:
        launch_early(plan.launch, backend)
    except (OSError, VMError) as error:  # the sandbox's start will say it again
        log.info("not launching the VM of %s ahead: %s", container_id, error)
    return EarlyStart(backend, plan)


def prestart(starter: SandboxStarter, plan: ContainerPlan) -> None:
    """Starts the sandbox of the plan in the background."""
    starter.prestart(plan.launch, EXPIRE_AFTER_S)
