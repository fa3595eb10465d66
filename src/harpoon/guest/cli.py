"""`harpoon guest ...`: build the guest image and show where it is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
from rich.console import Console

from harpoon import dirs
from harpoon.guest import build as build_module
from harpoon.guest import cache, debian, elf, kernel, python_runtime, sources
from harpoon.guest import lock as locks
from harpoon.guest.build import build_guest

BUILD_ERRORS = (
    debian.DebianError,
    python_runtime.PythonRuntimeError,
    kernel.KernelImageError,
    elf.ElfError,
    subprocess.CalledProcessError,
    OSError,
)


@click.group()
def guest() -> None:
    """The guest VM image (kernel + initramfs)."""


@guest.command()
@click.option("--arch", type=click.Choice(cache.ARCHES), default=None, help="Default: the host's.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Downloads (default ${cache.CACHE_DIR_ENV} or {dirs.DEFAULT_CACHE_DIR}).",
)
@click.option(
    "--guest-dir",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Built images (default ${cache.GUEST_DIR_ENV} or <state>/guest: harpoon.dirs).",
)
@click.option(
    "--refresh",
    is_flag=True,
    help="Re-resolve every package's version from the archive (apt's lists where there is "
    "apt, else the indices fetched in Python) and rewrite the lock "
    f"(harpoon/guest/locks/<arch>.json, or ${locks.LOCK_DIR_ENV}/<arch>.json).",
)
@click.option(
    "--fetch",
    type=click.Choice(build_module.FETCH_METHODS),
    default=None,
    help=f"How to fetch packages (default ${build_module.FETCH_ENV}, else apt where apt-get "
    "is on PATH, else python: harpoon's own, which needs a mirror: "
    f"${sources.MIRROR_ENV} and ${sources.SECURITY_MIRROR_ENV}, or the host's apt sources).",
)
def build(
    arch: str | None,
    cache_dir: Path | None,
    guest_dir: Path | None,
    refresh: bool,
    fetch: str | None,
) -> None:
    """Build the guest image from the packages of the repo's lock, or say it is up to date."""
    console = Console(stderr=True, log_path=False)
    with console.status("building the guest image") as status:

        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        try:
            image = build_guest(
                arch,
                cache_dir=cache_dir,
                guest_dir=guest_dir,
                refresh=refresh,
                fetch=fetch,
                report=report,
            )
        except BUILD_ERRORS as error:
            raise click.ClickException(
                f"building the {arch or 'host'} guest failed: {error}"
            ) from error
    click.echo(f"kernel {image.kernel}\ninitrd {image.initrd}\ndigest {image.digest}")


@guest.command()
@click.option("--arch", type=click.Choice(cache.ARCHES), default=None, help="Default: the host's.")
@click.option("--guest-dir", type=click.Path(path_type=Path), default=None)
def show(arch: str | None, guest_dir: Path | None) -> None:
    """Print the current image's manifest (fails when none is built)."""
    try:
        image = cache.find_guest(arch, guest_dir)
    except cache.GuestNotBuiltError as error:
        raise click.ClickException(str(error)) from error
    json.dump(cache.load_manifest(image.kernel.parent), sys.stdout, indent=1)
    click.echo()
