"""Which VM a container gets, decided once: its configuration and how it starts.

A LaunchPlan is computed from the VM's configuration before anything is launched, by
`plan_launch`: restore the VM template whose key is the configuration's template
identity (harpoon.sandbox.template), or boot cold (no store, templates off, a backend
that cannot restore, a VM with bind shares (harpoon.sandbox.bind_shares), or no
template built yet for this layout). The shim's daemon
computes it from config.json as soon as it starts, launches that very plan early
(`launch_early`, no event loop needed), and the Sandbox that Create takes runs the same
plan object: there is no second decision that could disagree with the first.

This module must import nothing that loads asyncio or protobuf.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from harpoon.sandbox import bind_shares, rootfs, template
from harpoon.sandbox.template import Template, TemplateStore
from harpoon.vmm.backend import Backend
from harpoon.vmm.base import VMConfig
from harpoon.vmm.devices import ShareFs

log = logging.getLogger(__name__)

#: Which filesystem the VM's shares use: "9p", "virtiofs" (a VM that never has a
#: template: virtiofs cannot be saved by QEMU 7.2), or "auto" (the default): 9p
#: wherever a template is or will be used, AUTO_COLD_SHARE_FS for a VM that boots cold
#: without one (templates off), if the backend can serve it.
SHARE_FS_ENV = "HARPOON_SHARE_FS"
SHARE_FS_SETTINGS = ("9p", "virtiofs", "auto")
#: The rule chosen by measurement (bench/share.py; the table in bench/README.md): 9p.
#: virtiofs is not faster across the board here (its `find` up to 5x slower: with
#: --cache=never every lookup is a round trip; faster untar at 2,000 files, not at
#: 20,000), costs the template (a cold boot every time) and, uncached on the 6.1 guest,
#: refuses writable MAP_SHARED mappings (ENODEV), which 9p's cache=mmap serves.
AUTO_COLD_SHARE_FS: ShareFs = "9p"

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
    netns_owned: bool = False
    """config.netns is harpoon's (created for this VM, removed with it), not a namespace
    someone else made and named (a CRI pod's)."""

    @property
    def restores(self) -> bool:
        return self.template is not None


def plan_launch(
    config: VMConfig,
    backend: Backend,
    templates: Templates = None,
    rootfs_share: Path | None = None,
    netns_owned: bool = False,
) -> LaunchPlan:
    """The plan for a VM of config: restore its template if the store has it, else boot
    (and have the template built once the container runs). Cheap: a few stats."""
    fitted = backend.fit(config)
    if fitted.machine != config.machine:
        # Moved to a roomier machine for its many devices (an erofs rootfs of many
        # layers): a template would fit only images of that very layer count, and its
        # build boots one more such VM; it boots cold and builds none.
        log.info("%s: %d devices, machine %s: booting cold", config.name,
                 len(config.devices), fitted.machine)  # fmt: skip
        templates = False
    if any(bind_shares.is_bind_share(share) for share in config.shares):
        # Host binds as shares of their own: the layout names every bound directory,
        # so a template would serve only containers binding as many; none is looked up
        # or built for it (a container without binds keeps its template).
        log.info("%s: host binds shared as devices of their own: booting cold", config.name)
        templates = False
    plan = _plan_launch(fitted, backend, templates, rootfs_share)
    return replace(plan, netns_owned=netns_owned) if netns_owned else plan


def _plan_launch(
    config: VMConfig,
    backend: Backend,
    templates: Templates,
    rootfs_share: Path | None,
) -> LaunchPlan:
    store = TemplateStore.from_environment() if templates is None else templates
    setting = share_fs_setting()
    if setting == "virtiofs" or (
        setting == "auto" and not store and AUTO_COLD_SHARE_FS != "9p" and backend.serves_virtiofs()
    ):
        log.info("%s: virtiofs shares (%s=%s): booting cold", config.name, SHARE_FS_ENV, setting)
        return LaunchPlan(with_share_fs(config, "virtiofs"), rootfs_share)
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


def share_fs_setting() -> str:
    """HARPOON_SHARE_FS, checked ("auto" when unset)."""
    setting = os.environ.get(SHARE_FS_ENV) or "auto"
    if setting not in SHARE_FS_SETTINGS:
        raise ValueError(f"{SHARE_FS_ENV}={setting!r}: use one of {', '.join(SHARE_FS_SETTINGS)}")
    return setting


def with_share_fs(config: VMConfig, fs: ShareFs) -> VMConfig:
    """config with every share served as fs."""
    return replace(config, shares=tuple(replace(share, fs=fs) for share in config.shares))


def launch_early(plan: LaunchPlan, backend: Backend) -> None:
    """Launches the plan's VMM now, before the event loop exists (the daemon's first
    step); the Sandbox started with the same plan and backend takes it. Raises VMError
    or OSError when it cannot be launched (the sandbox's start will say so again)."""
    if plan.rootfs_share is not None:
        rootfs.prepare(plan.rootfs_share)  # the VMM opens its exports as it starts
    prepare_network(plan)
    if plan.template is None:
        backend.launch_early(plan.config, None)
    else:
        restoring = template.restore_config(plan.config, plan.template)
        backend.launch_early(restoring, plan.template.state)


def prepare_network(plan: LaunchPlan) -> None:
    """The VM's network namespace and its tap, before its VMM launches (idempotent)."""
    if plan.config.netns is not None:
        from harpoon.net import wire

        wire.prepare(plan.config.netns, plan.netns_owned)


def release_network(plan: LaunchPlan) -> None:
    """Undoes prepare_network (and the redirects made since), once the VMM is gone."""
    if plan.config.netns is not None:
        from harpoon.net import wire

        wire.release(plan.config.netns, plan.netns_owned)
