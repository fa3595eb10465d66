"""`harpoon template ...`: build the VM template containers start from, and list them.

It lives with the shim because the template it builds is the VM the shim's plan gives a
container without resource limits (harpoon.shim.container_plan)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from harpoon.guest import cache
from harpoon.sandbox.plan import with_share_fs
from harpoon.sandbox.template import META_NAME, TEMPLATE_DIR_ENV, TemplateStore
from harpoon.sandbox.template_builder import scratch_netns
from harpoon.shim.bundle import Bundle
from harpoon.shim.container_plan import plan_container
from harpoon.vmm.backend import Backend, default_backend
from harpoon.vmm.base import VMConfig, VMError

# The smallest specs a container can have: no limits, no mounts; the host's network
# (a gvproxy NIC) or a network namespace of its own (a tap NIC: `ctr run`, nerdctl).
# BuildKit's RUN steps have these layouts too (no limits; their binds, /etc/resolv.conf,
# /etc/hosts and secrets, go through the rootfs share, not devices of their own): its
# default network in "host" mode is the first, `RUN --network=none` and its "cni" mode
# the second. Issue 16 saw its steps cold-boot one after another: the template builder
# a cold-booted host-network step starts dropped its NIC's gvproxy flag and saved the
# template under another key, and a restored guest did not find a NIC whose MAC was
# the container's (both fixed in a79625b; pinned by tests/unit/test_template_store.py
# and tests/e2e/test_buildkit.py).
_PLAIN_SPECS: dict[str, dict[str, Any]] = {
    "the host's network": {"process": {"args": ["sh"]}},
    "a network namespace": {
        "process": {"args": ["sh"]},
        "linux": {"namespaces": [{"type": "network"}]},
    },
}


def container_config(
    image: cache.GuestImage, backend: Backend, spec: dict[str, Any] | None = None
) -> VMConfig:
    """The VM the shim's plan gives a container of spec (default: the first of
    _PLAIN_SPECS) without resource limits (its paths are replaced when the template is
    made): a template made from it is the one those containers restore."""
    bundle = Bundle(Path("/nonexistent"), spec or next(iter(_PLAIN_SPECS.values())))
    plan = plan_container("template", "template", bundle, image, backend, templates=False)
    # A template's shares are 9p whatever HARPOON_SHARE_FS says for cold boots (QEMU
    # cannot save a virtiofs device).
    return with_share_fs(plan.launch.config, "9p")


def _store(template_dir: Path | None) -> TemplateStore:
    if template_dir is not None:
        return TemplateStore(template_dir)
    store = TemplateStore.from_environment()
    if store is None:
        raise click.ClickException("VM templates are turned off ($HARPOON_TEMPLATES)")
    return store


TEMPLATE_DIR_OPTION = click.option(
    "--template-dir",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Where templates live (default ${TEMPLATE_DIR_ENV} or <state>/templates: harpoon.dirs).",
)


@click.group()
def template() -> None:
    """VM templates: guests saved at "agent ready" that containers restore instead of boot."""


@template.command()
@click.option("--arch", type=click.Choice(cache.ARCHES), default=None, help="Default: the host's.")
@click.option("--guest-dir", type=click.Path(path_type=Path), default=None)
@TEMPLATE_DIR_OPTION
def build(arch: str | None, guest_dir: Path | None, template_dir: Path | None) -> None:
    """Build the template for the current guest image, or say it is up to date."""
    try:
        image = cache.find_guest(arch, guest_dir)
    except cache.GuestNotBuiltError as error:
        raise click.ClickException(str(error)) from error
    store = _store(template_dir)
    backend = default_backend()
    for network, spec in _PLAIN_SPECS.items():
        try:
            with scratch_netns(container_config(image, backend, spec)) as config:
                built = asyncio.run(store.build(config, backend))
        except (VMError, OSError, TimeoutError) as error:
            message = f"building the {image.arch} VM template ({network}) failed: {error}"
            raise click.ClickException(message) from error
        if built is None:
            # Not an error: install-deps builds templates whatever the backend.
            click.echo(
                f"the {backend.name} backend cannot save guests: no template "
                "(every container's VM boots cold)"
            )
            return
        meta = json.loads((built.directory / META_NAME).read_text())
        click.echo(
            f"template {built.directory} ({network})\n"
            f"state {meta['state_bytes'] / 1e6:.0f} MB, boot {meta['boot_s']} s, "
            f"save {meta['save_s']} s, restore {meta['verify_restore_s']} s"
        )


@template.command(name="list")
@TEMPLATE_DIR_OPTION
def list_templates(template_dir: Path | None) -> None:
    """The templates built so far, most recently used first."""
    store = _store(template_dir)
    metas = sorted(store.root.glob(f"*/{META_NAME}"), key=lambda p: -p.stat().st_mtime)
    for path in metas:
        meta = json.loads(path.read_text())
        click.echo(f"{path.parent.name} {meta['state_bytes'] / 1e6:.0f} MB {meta['identity']}")
