"""`harpoon template ...`: build the VM template containers start from, and list them."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import click

from harpoon.guest import cache
from harpoon.sandbox.template import META_NAME, TEMPLATE_DIR_ENV, TemplateStore
from harpoon.vmm.base import Share, VMConfig, VMError

ROOTFS_SHARE_TAG = "rootfs"


def container_config(image: cache.GuestImage, read_only: bool) -> VMConfig:
    """The VM configuration the shim gives every container (harpoon.shim.task's Create),
    with placeholder paths: a template made from it matches those containers."""
    placeholder = Path(tempfile.gettempdir())
    return VMConfig(
        name="template",
        arch=image.arch,
        kernel=image.kernel,
        initrd=image.initrd,
        state_dir=placeholder,
        shares=(Share(ROOTFS_SHARE_TAG, placeholder, read_only=read_only),),
    )


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
    help=f"Where templates live (default ${TEMPLATE_DIR_ENV} or /var/lib/harpoon/templates).",
)


@click.group()
def template() -> None:
    """VM templates: guests saved at "agent ready" that containers restore instead of boot."""


@template.command()
@click.option("--arch", type=click.Choice(cache.ARCHES), default=None, help="Default: the host's.")
@click.option("--read-only-rootfs", is_flag=True, help="For containers with a read-only root.")
@click.option("--guest-dir", type=click.Path(path_type=Path), default=None)
@TEMPLATE_DIR_OPTION
def build(
    arch: str | None, read_only_rootfs: bool, guest_dir: Path | None, template_dir: Path | None
) -> None:
    """Build the template for the current guest image, or say it is up to date."""
    from harpoon.vmm.qemu import QemuVM

    try:
        image = cache.find_guest(arch, guest_dir)
    except cache.GuestNotBuiltError as error:
        raise click.ClickException(str(error)) from error
    store = _store(template_dir)
    try:
        built = asyncio.run(store.build(container_config(image, read_only_rootfs), QemuVM))
    except (VMError, OSError, TimeoutError) as error:
        message = f"building the {image.arch} VM template failed: {error}"
        raise click.ClickException(message) from error
    if built is None:
        raise click.ClickException("this VMM cannot save guests: no template")
    meta = json.loads((built.directory / META_NAME).read_text())
    click.echo(
        f"template {built.directory}\n"
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
