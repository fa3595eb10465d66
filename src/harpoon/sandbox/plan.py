"""Which VM a container gets, decided once: its configuration and how it starts.

A LaunchPlan is computed from the VM's configuration before anything is launched, by
`plan_launch`: restore the VM template whose key is the configuration's template
identity (harpoon.sandbox.template), or boot cold (no store, templates off, a backend
that cannot restore, or no template built yet for this layout). The shim's daemon
computes it from config.json as soon as it starts, launches that very plan early
(`launch_early`, no event loop needed), and the Sandbox that Create takes runs the same
plan object: there is no second decision that could disagree with the first.

This module must import nothing that loads asyncio or protobuf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harpoon.sandbox import rootfs, template
from harpoon.sandbox.template import Template, TemplateStore
from harpoon.vmm.backend import Backend
from harpoon.vmm.base import VMConfig

log = logging.getLogger(__name__)

Templates = TemplateStore | Literal[False] | None
"""Where VM templates live: a store; None for the one the environment names
(TemplateStore.from_environment); False to always boot cold."""


@dataclass(frozen=True)
class LaunchPlan:
    config: VMConfig
    rootfs_share: Path | None = None
    """The host directory of config's rootfs share (harpoon.sandbox.rootfs), which the
    sandbox creates and removes; None for a VM without one."""
    store: TemplateStore | None = None
    """Where this VM's template lives or is to be built; None when it never has one
    (templates off, or a backend that cannot save guests)."""
    template: Template | None = None
    """The template to restore; None to boot cold."""

    @property
    def restores(self) -> bool:
        return self.template is not None


def plan_launch(
    config: VMConfig,
    backend: Backend,
    templates: Templates = None,
    rootfs_share: Path | None = None,
) -> LaunchPlan:
    """The plan for a VM of config: restore its template if the store has it, else boot
    (and have the template built once the container runs). Cheap: a few stats."""
    store = TemplateStore.from_environment() if templates is None else templates
    if not store:
        return LaunchPlan(config, rootfs_share)
    identity = backend.template_identity(config)
    if identity is None:
        log.info("%s: this VMM cannot restore guests: booting cold", config.name)
        return LaunchPlan(config, rootfs_share)
    key = template.template_key(identity)
    found = store.find(key)
    if found is None:
        log.info("%s: no VM template %s in %s: booting cold", config.name, key, store.root)
    return LaunchPlan(config, rootfs_share, store, found)


def launch_early(plan: LaunchPlan, backend: Backend) -> None:
    """Launches the plan's VMM now, before the event loop exists (the daemon's first
    step); the Sandbox started with the same plan and backend takes it. Raises VMError
    or OSError when it cannot be launched (the sandbox's start will say so again)."""
    if plan.rootfs_share is not None:
        rootfs.prepare(plan.rootfs_share)  # the VMM opens its exports as it starts
    if plan.template is None:
        backend.launch_early(plan.config, None)
    else:
        restoring = template.restore_config(plan.config, plan.template)
        backend.launch_early(restoring, plan.template.state)
