"""A container's plan: the spec its guest runs and the VM it runs in, from config.json.

Planned once per container by the transformers of Create's pipeline
(harpoon.shim.transform), before any VM exists: the shim's daemon plans as soon as it
starts and launches the plan's VM early (harpoon.shim.prestart); Create runs that same
plan. A spec harpoon cannot run is refused here, so no VM is ever launched for it.

This module must import nothing that loads asyncio or protobuf.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon.sandbox.bind_shares import BindShare
from harpoon.sandbox.binds import HostBind
from harpoon.sandbox.plan import LaunchPlan, Templates, plan_launch
from harpoon.shim import paths
from harpoon.shim.bundle import Bundle
from harpoon.shim.transform import PIPELINE, Draft
from harpoon.shim.transform.guest_rootfs import GuestRootfs, MountLike
from harpoon.vmm.backend import Backend
from harpoon.vmm.base import VMConfig

if TYPE_CHECKING:
    from harpoon.guest.cache import GuestImage


@dataclass(frozen=True)
class ContainerPlan:
    container_id: str
    bundle: Bundle
    guest_spec: bytes
    """config.json as crun runs it in the guest (JSON)."""
    launch: LaunchPlan
    binds: tuple[HostBind, ...] = ()
    """Host paths bound into the VM's share at Create."""
    bind_shares: tuple[BindShare, ...] = ()
    """Host directories shared into the VM for binds, mounted in the guest at Create
    (the way of hosts that cannot bind mount: harpoon.sandbox.bind_shares)."""
    guest_rootfs: GuestRootfs | None = None
    """The rootfs the guest assembles from disks (an erofs snapshot), if it is one."""


def plan_guest(
    namespace: str,
    container_id: str,
    spec: dict[str, Any],
    host_hostname: str | None = None,
    bundle_dir: Path | None = None,
    rootfs_mounts: tuple[MountLike, ...] = (),
) -> Draft:
    """Every transformer's plan for spec, in the pipeline's order (reads nothing but the
    types of bind mounts' sources)."""
    hostname = host_hostname if host_hostname is not None else os.uname().nodename
    draft = Draft(
        namespace, container_id, spec, hostname, bundle_dir=bundle_dir, rootfs_mounts=rootfs_mounts
    )
    for transformer in PIPELINE:
        transformer.plan(draft)
    return draft


def plan_container(
    namespace: str,
    container_id: str,
    bundle: Bundle,
    image: GuestImage,
    backend: Backend,
    templates: Templates = None,
    rootfs_mounts: tuple[MountLike, ...] = (),
) -> ContainerPlan:
    """The container's plan; an errdefs error for a spec harpoon cannot run.
    `rootfs_mounts`: containerd's, when the guest assembles them (known at Create only)."""
    draft = plan_guest(
        namespace, container_id, bundle.spec, bundle_dir=bundle.path, rootfs_mounts=rootfs_mounts
    )
    config = VMConfig(
        name=container_id,
        arch=image.arch,
        kernel=image.kernel,
        initrd=image.initrd,
        state_dir=paths.vm_state_dir(namespace, container_id),
        cpus=draft.cpus,
        memory_mib=draft.memory_mib,
        shares=tuple(draft.shares),
        disks=tuple(draft.disks),
        nics=tuple(draft.nics),
        netns=draft.netns,
    )
    launch = plan_launch(config, backend, templates, draft.rootfs_share, draft.netns_owned)
    return ContainerPlan(
        container_id,
        bundle,
        encode(draft.guest_spec),
        launch,
        tuple(draft.binds),
        tuple(draft.bind_shares),
        draft.guest_rootfs,
    )


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
