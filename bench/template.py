"""The VM template the measured harpoon runs restore: the one `harpoon template build`
makes for a container without resource limits, in the store the shims use
($HARPOON_TEMPLATE_DIR or the default). Built here, or waited for while a shim's
background builder (harpoon.sandbox.template_builder) holds the store's lock."""

from __future__ import annotations

from harpoon.guest import GuestImage
from harpoon.sandbox.template import TemplateStore
from harpoon.shim.template_cli import container_config
from harpoon.vmm.backend import default_backend
from harpoon.vmm.base import VMError


async def ensure_template(guest: GuestImage) -> str:
    """Makes sure the template exists; says which, or why there is none."""
    store = TemplateStore.from_environment()
    if store is None:
        return "VM templates are off: harpoon runs boot cold"
    try:
        backend = default_backend()
        built = await store.build(container_config(guest, backend), backend)
    except (VMError, OSError, TimeoutError) as error:
        return f"no VM template ({error}): harpoon runs will boot cold"
    if built is None:
        return "QEMU cannot save guests: harpoon runs boot cold"
    return f"VM template {built.key} in {built.directory}"
