"""The guest images the VM tests boot: the host's architecture, and arm64 (the guest of
an Apple silicon Mac) under TCG. Built once per machine by `harpoon guest build`
(scripts/install-deps builds the host's; the first arm64 test builds its own, cached)."""

from __future__ import annotations

import functools
import os
import shutil

import pytest

from harpoon.guest.cache import GuestImage
from harpoon.vmm.backend import host_arch

#: Every architecture a VM test module may boot, the host's first.
GUEST_ARCHES = tuple(dict.fromkeys((host_arch(), "amd64", "arm64")))
QEMU_BINARY = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}


@functools.cache
def _built(arch: str) -> GuestImage:
    from harpoon.guest import build_guest, find_guest

    if arch == host_arch():
        return find_guest(arch)
    return build_guest(arch)


def guest_for(arch: str) -> GuestImage:
    """The guest image of arch; skips (fails in CI) when it cannot be had or booted."""
    if shutil.which(QEMU_BINARY[arch]) is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{QEMU_BINARY[arch]} is not installed (scripts/install-deps)")
        pytest.skip(f"needs {QEMU_BINARY[arch]}")
    try:
        return _built(arch)
    except Exception as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no {arch} guest image: {error}")
