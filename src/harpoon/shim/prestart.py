"""The container's VM, as Create will ask for it, started before Create comes.

containerd writes the bundle's config.json before it runs `shim start`, and then still
has to read start's answer, connect and send Create: the daemon starts the VM from the
bundle at once (harpoon.sandbox.SandboxStarter), and Create takes it when it asks for
the same configuration. Create and the daemon build that configuration with the same
function, `vm_config`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from harpoon.shim import paths
from harpoon.vmm.base import Share, VMConfig

if TYPE_CHECKING:
    from harpoon.guest.cache import GuestImage
    from harpoon.sandbox.sandbox import SandboxStarter
    from harpoon.shim.resources import VMSize

ROOTFS_SHARE_TAG = "rootfs"
# How long a VM started ahead waits for its Create before it is stopped.
EXPIRE_AFTER_S = 60.0

log = logging.getLogger(__name__)


def vm_config(namespace: str, container_id: str, image: GuestImage, size: VMSize) -> VMConfig:
    """The VM of one container. Its rootfs share is an export of its own, into which
    Create binds the rootfs (harpoon.sandbox.rootfs): writable even for --read-only, as
    the guest creates its mount points first and makes the root read-only after."""
    return VMConfig(
        name=container_id,
        arch=image.arch,
        kernel=image.kernel,
        initrd=image.initrd,
        state_dir=paths.vm_state_dir(namespace, container_id),
        cpus=size.cpus,
        memory_mib=size.memory_mib,
        shares=(Share(ROOTFS_SHARE_TAG, paths.share_dir(namespace, container_id)),),
    )


def rootfs_share(config: VMConfig) -> Path:
    return config.shares[0].host_path


def prestart(
    starter: SandboxStarter, namespace: str, container_id: str, bundle_dir: str, image: GuestImage
) -> bool:
    """Starts the VM for the bundle's spec in the background; False (and nothing
    started) when the bundle cannot say what Create will ask for."""
    from harpoon.shim.bundle import Bundle
    from harpoon.shim.resources import vm_size

    try:
        bundle = Bundle.load(bundle_dir)
        config = vm_config(namespace, container_id, image, vm_size(bundle.spec))
    except Exception as error:  # Create will report it, if it is an error at all
        log.info("not starting the VM of %s ahead: %s", container_id, error)
        return False
    starter.prestart(config, rootfs_share(config), EXPIRE_AFTER_S)
    return True
