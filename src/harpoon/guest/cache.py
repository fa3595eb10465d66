"""Where guest images and downloads live, and finding a built image quickly.

Layout (each root overridable by argument or environment):
    $HARPOON_GUEST_DIR (<state>/guest: harpoon.dirs)/<arch>/<digest16>/   one built image
        vmlinux | Image, initrd.cpio[.gz], floor.cpio, manifest.json
    $HARPOON_GUEST_DIR/<arch>/current -> <digest16>                  the newest build
    $HARPOON_CACHE_DIR (/var/cache/harpoon)/debs/<arch>/             .debs (of any fetch)
    $HARPOON_CACHE_DIR/apt/<arch>/                                   private apt state
    $HARPOON_CACHE_DIR/debian-indexes/                               Packages files by SHA256
                                                                     (the fetch without apt)
    $HARPOON_CACHE_DIR/wheels/                                       the protobuf wheel

The packages themselves are pinned in the repo (harpoon.guest.lock).
`find_guest` reads one small manifest and hashes nothing: the shim calls it on every
container create. This module never builds or downloads anything.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harpoon import dirs

GUEST_DIR_ENV = dirs.GUEST_DIR_ENV
CACHE_DIR_ENV = dirs.CACHE_DIR_ENV
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "current"
DIGEST_DIR_CHARS = 16
KEEP_IMAGES = 3  # per architecture, the current one included: a running VM may use another
ARCHES = ("amd64", "arm64")


class GuestNotBuiltError(FileNotFoundError):
    """No guest image has been built for an architecture."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel (ELF vmlinux on amd64, Image on arm64) and initramfs."""

    arch: str
    kernel: Path
    initrd: Path
    kernel_release: str
    digest: str


def host_arch() -> str:
    """The host's architecture (harpoon.vmm.backend's word), if harpoon has guests for it."""
    from harpoon.vmm.backend import host_arch as vmm_host_arch

    arch = vmm_host_arch()
    if arch not in ARCHES:
        raise ValueError(f"no guest architecture for host architecture {arch!r}")
    return arch


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise ValueError(f"guest architecture must be one of {', '.join(ARCHES)}, not {arch!r}")
    return arch


def guest_root(guest_dir: Path | None = None) -> Path:
    return guest_dir or Path(dirs.guest_dir())


def cache_root(cache_dir: Path | None = None) -> Path:
    return cache_dir or Path(dirs.cache_dir())


def digest_of(inputs: dict[str, Any]) -> str:
    """The content address of a build: SHA-256 of its inputs as canonical JSON."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def image_dir(arch: str, digest: str, guest_dir: Path | None = None) -> Path:
    return guest_root(guest_dir) / arch / digest[:DIGEST_DIR_CHARS]


def load_manifest(directory: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((directory / MANIFEST_NAME).read_text())
    return manifest


def image_from_manifest(directory: Path, which: str = "initrd") -> GuestImage:
    manifest = load_manifest(directory)
    return GuestImage(
        arch=manifest["arch"],
        kernel=directory / manifest["kernel"],
        initrd=directory / manifest[which],
        kernel_release=manifest["kernel_release"],
        digest=manifest["digest"] if which == "initrd" else f"{manifest['digest']}-floor",
    )


def find_guest(
    arch: str | None = None, guest_dir: Path | None = None, which: str = "initrd"
) -> GuestImage:
    """The current built image for `arch` (the host's by default), without building."""
    arch = check_arch(arch or host_arch())
    current = guest_root(guest_dir) / arch / CURRENT_NAME
    try:
        directory = current.resolve(strict=True)
        return image_from_manifest(directory, which)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as error:
        raise GuestNotBuiltError(
            f"no {arch} guest image under {current}: run `harpoon guest build --arch {arch}`"
        ) from error


def set_current(arch: str, directory: Path, guest_dir: Path | None = None) -> None:
    """Point `<arch>/current` at `directory`, atomically."""
    current = guest_root(guest_dir) / arch / CURRENT_NAME
    temporary = current.with_name(f".{CURRENT_NAME}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(directory.name)
    temporary.replace(current)


def prune(arch: str, guest_dir: Path | None = None, keep: int = KEEP_IMAGES) -> list[Path]:
    """Delete all but the `keep` newest images of `arch` (never the current one)."""
    root = guest_root(guest_dir) / arch
    current = (root / CURRENT_NAME).resolve()
    images = [p for p in root.iterdir() if (p / MANIFEST_NAME).is_file() and not p.is_symlink()]
    images.sort(key=lambda p: (p == current, (p / MANIFEST_NAME).stat().st_mtime), reverse=True)
    doomed = images[keep:]
    for directory in doomed:
        shutil.rmtree(directory, ignore_errors=True)
    return doomed


@contextmanager
def build_lock(arch: str, guest_dir: Path | None = None) -> Iterator[None]:
    """Serialize builds of one architecture (two shims may ask at once)."""
    directory = guest_root(guest_dir) / arch
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
