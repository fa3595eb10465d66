"""The container's VM, as Create will ask for it, started before Create comes.

containerd writes the bundle's config.json before it runs `shim start`, and then still
has to read start's answer, connect and send Create: the daemon starts the VM from the
bundle at once, and Create takes it when it asks for the same configuration. Create
and the daemon build that configuration with the same function, `vm_config`.

It starts in two steps. `launch` runs first thing in the daemon, before asyncio and
what serves containerd are loaded (~60 ms of imports): it reads the bundle, finds the
VM template that fits and launches QEMU, whose own start-up (~25 ms) then overlaps
those imports. `prestart` then has harpoon.sandbox.SandboxStarter start the sandbox,
whose VM runs that QEMU (harpoon.vmm.qemu_launch.Prelaunched). This module must import
nothing that loads asyncio or protobuf.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from harpoon.shim import paths
from harpoon.vmm.base import Share, VMConfig, VMError

if TYPE_CHECKING:
    from harpoon.guest.cache import GuestImage
    from harpoon.sandbox.sandbox import SandboxStarter
    from harpoon.shim.resources import VMSize
    from harpoon.vmm.qemu_launch import Prelaunched, QemuLaunch

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


class EarlyVM:
    """The VM the bundle asks for, and its QEMU if it could be launched already."""

    def __init__(self, config: VMConfig, prelaunched: Prelaunched | None) -> None:
        self.config = config
        self.prelaunched = prelaunched


def launch(namespace: str, container_id: str, bundle_dir: str) -> EarlyVM | None:
    """The bundle's VM configuration, with its QEMU launched (no event loop needed);
    None (and nothing launched) when the bundle cannot say what Create will ask for."""
    from harpoon.guest import find_guest
    from harpoon.shim.bundle import Bundle
    from harpoon.shim.resources import vm_size
    from harpoon.vmm.qemu_launch import Prelaunched, host_arch

    try:
        image = find_guest(host_arch())
        bundle = Bundle.load(bundle_dir)
        config = vm_config(namespace, container_id, image, vm_size(bundle.spec))
    except Exception as error:  # Create will report it, if it is an error at all
        log.info("not starting the VM of %s ahead: %s", container_id, error)
        return None
    try:
        prelaunched = Prelaunched(_launch_qemu(config))
    except (OSError, VMError) as error:  # the sandbox's start will say it again
        log.info("not launching the VM of %s ahead: %s", container_id, error)
        prelaunched = None
    return EarlyVM(config, prelaunched)


def _launch_qemu(config: VMConfig) -> QemuLaunch:
    """The launch the sandbox's start will ask for first (harpoon.sandbox.Sandbox):
    a restore of the VM template that fits, else a boot."""
    from harpoon.sandbox import rootfs, template
    from harpoon.vmm import qemu_launch

    rootfs.prepare(rootfs_share(config))  # QEMU opens its exports as it starts
    store = template.TemplateStore.from_environment()
    identity = qemu_launch.template_identity(config) if store is not None else None
    found = None
    if store is not None and identity is not None:
        found = store.find(template.template_key(identity))
    if found is None:
        return qemu_launch.launch(config)
    return qemu_launch.launch(template.restore_config(config, found), found.state)


def prestart(starter: SandboxStarter, early: EarlyVM) -> None:
    """Starts the sandbox of the early VM in the background."""
    starter.prestart(early.config, rootfs_share(early.config), EXPIRE_AFTER_S)
