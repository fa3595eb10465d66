"""The guest image: a Debian kernel and an initramfs holding busybox, Python and the agent.

Entry points: `build_guest` (build or find by content digest), `find_guest` (the built
image, fast, never builds), `build_floor_image` (the busybox-only boot baseline).

The builders are imported on first use: every shim finds its image, on the path of a
container's start, and the image builder's modules are not needed for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harpoon.guest.cache import GuestImage, GuestNotBuiltError, find_guest

if TYPE_CHECKING:
    from harpoon.guest.build import build_floor_image, build_guest

__all__ = ["GuestImage", "GuestNotBuiltError", "build_floor_image", "build_guest", "find_guest"]


def __getattr__(name: str) -> Any:
    if name in ("build_floor_image", "build_guest"):
        from harpoon.guest import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
