"""The guest image: a Debian kernel and an initramfs holding busybox, Python and the agent.

Entry points: `build_guest` (build or find by content digest), `find_guest` (the built
image, fast, never builds), `build_floor_image` (the busybox-only boot baseline).
"""

from harpoon.guest.build import build_floor_image, build_guest
from harpoon.guest.cache import GuestImage, GuestNotBuiltError, find_guest

__all__ = ["GuestImage", "GuestNotBuiltError", "build_floor_image", "build_guest", "find_guest"]
