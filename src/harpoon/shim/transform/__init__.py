"""Create as a pipeline of bundle transformers, one module per feature.

Each transformer does its part of turning containerd's bundle into a container in a VM,
in three steps (harpoon.shim.transform.draft.Transformer):

- `plan`: pure, from config.json alone, before any VM exists: edits the spec the guest
  will run, adds the devices its feature needs to the VM, and refuses (with an errdefs
  error naming what was wrong) what harpoon cannot run. The shim's daemon plans as soon
  as it starts, so a Create that config.json already shows must fail launches no VM.
- `before_vm` and `with_vm`: at Create, the host work of its feature (mounting the
  rootfs, sharing it into the VM, ...), each undo pushed onto Create's AsyncExitStack,
  so that a failure at any step leaves nothing behind.

The order is PIPELINE's: LinuxDefaults first (the Linux parts a spec written on macOS
lacks), before the transformers that read the guest spec's namespaces and mounts.
"""

from __future__ import annotations

from harpoon.shim.transform.draft import Draft, Transformer
from harpoon.shim.transform.guest_runtime import GuestRuntime
from harpoon.shim.transform.host_policy import HostPolicy
from harpoon.shim.transform.linux_defaults import LinuxDefaults
from harpoon.shim.transform.mounts import Mounts
from harpoon.shim.transform.network import Network
from harpoon.shim.transform.oci_hooks import HostHooks
from harpoon.shim.transform.resources import Resources
from harpoon.shim.transform.rootfs import Rootfs

PIPELINE: tuple[Transformer, ...] = (
    LinuxDefaults(),  # first: a spec made on macOS has no Linux parts for the others
    HostPolicy(),
    Rootfs(),
    Mounts(),
    HostHooks(),
    Network(),
    Resources(),
    GuestRuntime(),
)

__all__ = ["PIPELINE", "Draft", "Transformer"]
