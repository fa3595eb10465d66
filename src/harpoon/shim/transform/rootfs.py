"""The container's root filesystem: containerd's snapshot, shared into the VM.

Plan: the VM gets a share of its own for the rootfs (harpoon.sandbox.rootfs: an empty
export the rootfs is bound into once it exists, since the VM starts before Create
brings the rootfs mounts), and the guest's root.path is that share as the guest sees
it. At Create: containerd's mounts are mounted at <bundle>/rootfs (as runc's shim does;
with none, root.path is the root as it stands: `ctr run --rootfs DIR`), then bound into
the VM's share. The block path (erofs layers as disks) plugs in here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from harpoon.errdefs import FailedPrecondition
from harpoon.sandbox import rootfs
from harpoon.shim import paths
from harpoon.shim.bundle import mount_rootfs, unmount_rootfs
from harpoon.shim.transform.draft import CreateContext, Draft, Transformer
from harpoon.shim.transform.guest_rootfs import GuestRootfs, plan_guest_rootfs
from harpoon.vmm.base import VMError
from harpoon.vmm.devices import Share

if TYPE_CHECKING:
    from harpoon.api.containerd.types import mount_pb2
    from harpoon.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)

#: How long the guest may take to show a rootfs disk (its driver loads with the first).
DISK_TIMEOUT_S = 30.0


def describe(mounts: Iterable[mount_pb2.Mount]) -> str:
    """containerd's rootfs mounts, one `type source [options]` each, for the log."""
    return "; ".join(f"{m.type} {m.source} {list(m.options)}" for m in mounts) or "none"


class Rootfs(Transformer):
    def plan(self, draft: Draft) -> None:
        root = rootfs.GUEST_ROOTFS
        if draft.rootfs_mounts:
            # An erofs snapshot: its files become disks, the guest assembles the root.
            draft.guest_rootfs = plan_guest_rootfs(draft.rootfs_mounts)
            draft.disks.extend(draft.guest_rootfs.disks)
            root = draft.guest_rootfs.root
        draft.guest_spec["root"] = {**(draft.spec.get("root") or {}), "path": root}
        # The share stays either way: host binds go through it (harpoon.sandbox.binds).
        share = paths.share_dir(draft.namespace, draft.container_id)
        draft.shares.append(Share(rootfs.SHARE_TAG, share))
        draft.rootfs_share = share

    async def before_vm(self, create: CreateContext) -> None:
        log.info("rootfs mounts of %s: %s", create.request.id, describe(create.request.rootfs))
        if create.guest_rootfs is not None:
            return  # nothing on the host: the guest mounts the disks (with_vm)
        if create.request.rootfs:
            create.rootfs = create.bundle.path / "rootfs"
            mount_rootfs(create.rootfs, list(create.request.rootfs))
            create.undo.callback(unmount_rootfs, create.rootfs)
        else:
            create.rootfs = create.bundle.rootfs
            if not create.rootfs.is_dir():
                raise FailedPrecondition(f"the rootfs {create.rootfs} is not a directory")

    async def with_vm(self, create: CreateContext, sandbox: Sandbox) -> None:
        if create.guest_rootfs is not None:
            # Pushed before the mounts: runs after the container's processes have ended
            # and before the VM is killed.
            create.undo.push_async_callback(disassemble, create.guest_rootfs, sandbox)
            await assemble(create.guest_rootfs, sandbox)
            return
        # Undone by the sandbox's stop, which releases its whole share.
        sandbox.share_rootfs(create.rootfs)


async def assemble(guest: GuestRootfs, sandbox: Sandbox) -> None:
    """Mounts the rootfs disks in the guest (each found by its id) and the overlay on
    them; undone with the VM."""
    from harpoon.api.agent.v1 import agent_pb2

    agent = sandbox.agent
    if agent is None:
        raise VMError(f"sandbox {sandbox.config.name} has no agent to assemble its rootfs")
    started = time.monotonic()
    steps = []
    for mount in guest.mounts:
        began, source = time.monotonic(), mount.source
        if mount.disk is not None:
            source = await agent.wait_device(
                agent_pb2.WaitDeviceRequest.BLOCK, mount.disk, DISK_TIMEOUT_S
            )
            steps.append(f"found {mount.disk} {time.monotonic() - began:.2f} s")
            began = time.monotonic()
        await agent.mount(source, mount.target, mount.fstype, list(mount.options))
        steps.append(f"{mount.fstype} {time.monotonic() - began:.2f} s")
    log.info("assembled the rootfs of %s from %d disks in the guest in %.2f s (%s)",
             sandbox.config.name, len(guest.disks), time.monotonic() - started,
             ", ".join(steps))  # fmt: skip


async def disassemble(guest: GuestRootfs, sandbox: Sandbox) -> None:
    """Unmounts the guest rootfs, top first, so that the writable image holds every write
    before the VM is killed (its guest's page cache would die with it)."""
    agent = sandbox.agent
    if agent is None:
        return
    for mount in reversed(guest.mounts):
        try:
            await agent.unmount(mount.target)
        except Exception as error:  # a dead VM: nothing more can reach the image
            log.warning("unmounting %s in the VM of %s: %s", mount.target, sandbox.config.name,
                        error)  # fmt: skip
            return
