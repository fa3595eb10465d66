"""The spec's host-side OCI hooks, run where runc runs them (harpoon.shim.hooks runs
them; this step says when), and the State they read.

- Create: `prestart` then `createRuntime`, once the VM runs in the container's network
  namespace (its VMM is the pid the State names) and before the network step reads what
  they configured there (nerdctl's hook sets up CNI). Their failure fails Create.
- Start of the init: `poststart` (harpoon.shim.container), status "running"; its failure
  kills the container and fails Start.
- Once Create's hooks began, `poststop` runs when what Create made is undone: at a
  failed Create (runc's destroy runs it too) or at the init's Delete, after the VM and
  its network are gone. Its failure is logged, as the runtime-spec asks (runc fails its
  delete); a Delete is not refused for it.
- `createContainer` and `startContainer` hooks run in the container's namespaces, which
  are in the guest, where the host's programs are not: they are not run (a warning in
  the shim's log says so), as the README documents.

The State's annotations are the spec's, plus `nerdctl/network-namespace` naming the
VM's namespace, as Kata sets it: nerdctl's hook reads it before /proc/<pid>/ns/net.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon.shim import hooks
from harpoon.shim.hooks import GUEST_PHASES, HookFailed, HookPhase
from harpoon.shim.transform.draft import CreateContext, Draft, Transformer

if TYPE_CHECKING:
    from harpoon.sandbox.sandbox import Sandbox
    from harpoon.shim.bundle import Bundle

log = logging.getLogger(__name__)

NETNS_ANNOTATION = "nerdctl/network-namespace"
CREATE_PHASES = (HookPhase.PRESTART, HookPhase.CREATE_RUNTIME)


def state(
    container_id: str, bundle: Bundle, pid: int | None, netns: Path | None, phase: HookPhase
) -> bytes:
    """The OCI State a hook of `phase` reads on stdin."""
    annotations: dict[str, Any] = dict(bundle.spec.get("annotations") or {})
    if netns is not None:
        annotations.setdefault(NETNS_ANNOTATION, str(netns))
    annotations = {str(key): str(value) for key, value in annotations.items()}
    status = hooks.STATUS_IN_PHASE[phase]
    return hooks.state_json(container_id, pid, str(bundle.path), annotations, status)


async def run_phase(
    container_id: str, bundle: Bundle, pid: int | None, netns: Path | None, phase: HookPhase
) -> None:
    """Runs the spec's hooks of a host phase (HookFailed: the first that failed)."""
    found = hooks.hooks_of(bundle.spec, phase)
    if found:
        written = state(container_id, bundle, pid, netns, phase)
        await hooks.run_hooks(found, written, phase, cwd=bundle.path)


class HostHooks(Transformer):
    def plan(self, draft: Draft) -> None:
        for phase in HookPhase:
            hooks.hooks_of(draft.spec, phase)  # refused here, before any VM, if invalid

    async def before_vm(self, create: CreateContext) -> None:
        # First on the stack, so last off it: after the VM and its network are gone.
        create.undo.push_async_callback(_poststop, create)

    async def with_vm(self, create: CreateContext, sandbox: Sandbox) -> None:
        for phase in sorted(GUEST_PHASES):
            if hooks.hooks_of(create.bundle.spec, phase):
                log.warning(
                    "%s: its %s hooks are not run: they run in the container's namespaces, "
                    "which are in its VM", create.request.id, phase,
                )  # fmt: skip
        create.netns = sandbox.config.netns
        create.hooks_began = True  # from here on, undoing Create runs poststop
        for phase in CREATE_PHASES:
            await run_phase(create.request.id, create.bundle, sandbox.pid, create.netns, phase)


async def _poststop(create: CreateContext) -> None:
    if not create.hooks_began:
        return
    try:
        await run_phase(create.request.id, create.bundle, None, create.netns, HookPhase.POSTSTOP)
    except HookFailed as error:
        log.warning("%s: %s", create.request.id, error)
