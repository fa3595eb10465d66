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
from collections.abc import Iterable
from typing import TYPE_CHECKING

from harpoon.errdefs import FailedPrecondition
from harpoon.sandbox import rootfs
from harpoon.shim import paths
from harpoon.shim.bundle import mount_rootfs, unmount_rootfs
from harpoon.shim.transform.draft import CreateContext, Draft, Transformer
from harpoon.vmm.devices import Share

if TYPE_CHECKING:
    from harpoon.api.containerd.types import mount_pb2
    from harpoon.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)


def describe(mounts: Iterable[mount_pb2.Mount]) -> str:
    """containerd's rootfs mounts, one `type source [options]` each, for the log."""
    return "; ".join(f"{m.type} {m.source} {list(m.options)}" for m in mounts) or "none"


class Rootfs(Transformer):
    def plan(self, draft: Draft) -> None:
        draft.guest_spec["root"] = {**(draft.spec.get("root") or {}), "path": rootfs.GUEST_ROOTFS}
        share = paths.share_dir(draft.namespace, draft.container_id)
        draft.shares.append(Share(rootfs.SHARE_TAG, share))
        draft.rootfs_share = share

    async def before_vm(self, create: CreateContext) -> None:
        log.info("rootfs mounts of %s: %s", create.request.id, describe(create.request.rootfs))
        if create.request.rootfs:
            create.rootfs = create.bundle.path / "rootfs"
            mount_rootfs(create.rootfs, list(create.request.rootfs))
            create.undo.callback(unmount_rootfs, create.rootfs)
        else:
            create.rootfs = create.bundle.rootfs
            if not create.rootfs.is_dir():
                raise FailedPrecondition(f"the rootfs {create.rootfs} is not a directory")

    async def with_vm(self, create: CreateContext, sandbox: Sandbox) -> None:
        # Undone by the sandbox's stop, which releases its whole share.
        sandbox.share_rootfs(create.rootfs)
