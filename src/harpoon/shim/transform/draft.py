"""What the transformers of Create's pipeline share: the Draft they plan on, the
context of one Create, and the Transformer interface (see harpoon.shim.transform)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon.sandbox.bind_shares import BindShare
from harpoon.sandbox.binds import HostBind
from harpoon.shim.transform.guest_rootfs import GuestRootfs, MountLike
from harpoon.vmm.devices import NIC, Disk, Share

if TYPE_CHECKING:
    from harpoon.api.containerd.task.v2 import shim_pb2
    from harpoon.net.wire import Network
    from harpoon.sandbox.sandbox import Sandbox
    from harpoon.shim.bundle import Bundle


@dataclass
class Draft:
    """A container's VM and the spec its guest will run, while transformers plan them."""

    namespace: str
    container_id: str
    spec: dict[str, Any]
    """config.json as containerd wrote it: read, never changed."""
    host_hostname: str
    guest_spec: dict[str, Any] = field(default_factory=dict)
    """The spec crun will run in the guest; starts as a deep copy of spec."""
    cpus: int = 1
    memory_mib: int = 256
    shares: list[Share] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    nics: list[NIC] = field(default_factory=list)
    rootfs_share: Path | None = None
    """The host directory of the rootfs share, which the sandbox prepares and releases."""
    netns: Path | None = None
    """The network namespace the VM runs in (harpoon.shim.transform.network)."""
    netns_owned: bool = False
    """netns is harpoon's own, made for this container and removed with it."""
    binds: list[HostBind] = field(default_factory=list)
    """Host paths bound into the share at Create (harpoon.sandbox.binds)."""
    bind_shares: list[BindShare] = field(default_factory=list)
    """Host directories shared into the VM for binds, the other way (harpoon.sandbox.
    bind_shares); each is in `shares` too."""
    bundle_dir: Path | None = None
    """The bundle's directory, which relative bind sources are relative to."""
    rootfs_mounts: tuple[MountLike, ...] = ()
    """containerd's rootfs mounts when the guest assembles them (an erofs snapshot); else
    empty, and the rootfs is mounted on the host at Create (not known at plan time)."""
    guest_rootfs: GuestRootfs | None = None
    """The disks and guest mounts of such a rootfs (the rootfs transformer's plan)."""

    def __post_init__(self) -> None:
        if not self.guest_spec:
            self.guest_spec = copy.deepcopy(self.spec)


@dataclass
class CreateContext:
    """One Create in progress: what its transformers' host work needs."""

    request: shim_pb2.CreateTaskRequest
    bundle: Bundle
    undo: contextlib.AsyncExitStack
    rootfs: Path
    """The host directory that is the container's root (mounted by the rootfs step)."""
    binds: tuple[HostBind, ...] = ()
    """The plan's host binds."""
    bind_shares: tuple[BindShare, ...] = ()
    """The plan's bind shares, mounted in the guest at Create."""
    guest_rootfs: GuestRootfs | None = None
    """The plan's rootfs assembled in the guest from disks, if it is one."""
    network: Network | None = None
    """What CNI configured in the VM's namespace, for the guest (the network step)."""
    netns: Path | None = None
    """The VM's network namespace, once it runs (None: the host's)."""
    hooks_began: bool = False
    """Create's OCI hooks began: undoing Create runs the poststop ones."""


class Transformer:
    """One feature's part of Create; every step does nothing unless overridden."""

    def plan(self, draft: Draft) -> None:
        """Edits draft from its spec (pure: no I/O); raises an errdefs error for a spec
        harpoon cannot run."""

    async def before_vm(self, create: CreateContext) -> None:
        """Host work before the VM is taken; pushes its undo onto create.undo."""

    async def with_vm(self, create: CreateContext, sandbox: Sandbox) -> None:
        """Host or guest work once the VM runs; pushes its undo onto create.undo."""

    async def with_init(self, create: CreateContext, sandbox: Sandbox) -> None:
        """Work once the container's init is created in the guest (its namespaces exist,
        it has not started); pushes its undo onto create.undo."""
