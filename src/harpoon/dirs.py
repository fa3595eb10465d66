"""Every directory harpoon keeps things in on the host, from one place.

One movable root: with `HARPOON_ROOT` set, harpoon's state and run directories live
under it, so tests and several installs on one machine never share or delete each
other's VMs, templates or services:

| what | default | under $HARPOON_ROOT | its own variable (wins) |
|---|---|---|---|
| state: guest images, templates, the services' state | /var/lib/harpoon | $HARPOON_ROOT/lib | |
| guest images | <state>/guest | | HARPOON_GUEST_DIR |
| VM templates | <state>/templates | | HARPOON_TEMPLATE_DIR |
| run: VM state, shares, netns, sockets | /run/harpoon | $HARPOON_ROOT/run | HARPOON_RUN_DIR |
| the content-hashed build cache | /var/cache/harpoon | (shared) | HARPOON_CACHE_DIR |
| tools built from source | <cache>/tools | (shared) | HARPOON_TOOLS_DIR |
| test images | <cache>/images | (shared) | HARPOON_IMAGE_CACHE |

The cache stays shared under a root: what is in it is named by the hash of what it was
built from, so two installs can never disagree about it, and building it twice costs
minutes.

Each function reads the environment when called. The shim's `start` and `delete` are a
fresh Python on every container's critical path and call this: it imports os alone and
returns strings (callers make Paths). The guest's agent never imports it (an
import-linter contract): nothing in the VM knows the host's directories.
"""

from __future__ import annotations

import os

ROOT_ENV = "HARPOON_ROOT"
RUN_DIR_ENV = "HARPOON_RUN_DIR"
GUEST_DIR_ENV = "HARPOON_GUEST_DIR"
TEMPLATE_DIR_ENV = "HARPOON_TEMPLATE_DIR"
CACHE_DIR_ENV = "HARPOON_CACHE_DIR"
TOOLS_DIR_ENV = "HARPOON_TOOLS_DIR"
IMAGE_CACHE_ENV = "HARPOON_IMAGE_CACHE"

DEFAULT_STATE_DIR = "/var/lib/harpoon"
DEFAULT_RUN_DIR = "/run/harpoon"
DEFAULT_CACHE_DIR = "/var/cache/harpoon"

#: sun_path's size (108 bytes on Linux) less its terminating NUL.
UNIX_SOCKET_PATH_MAX_BYTES = 107
#: The longest path harpoon binds under a VM's state directory (`<run>/vm/<24 hex>/`):
#: gvproxy's sockets (the others: agent.sock, vmm.sock, vfs-rootfs.sock are shorter); checked
#: against the run directory up front (`check_run_dir`) so that a root too deep fails
#: when the services start, not at some container's Create.
VM_SOCKET_SUFFIX = "/vm/" + "0" * 24 + "/gvproxy-net.sock"


class SocketPathTooLong(ValueError):
    """A unix socket harpoon would bind is longer than the kernel allows."""


def _named(variable: str) -> str | None:
    return os.environ.get(variable) or None


def root() -> str | None:
    """$HARPOON_ROOT, if set (absolute, normalised), else None."""
    value = _named(ROOT_ENV)
    return os.path.abspath(value) if value else None


def state_dir() -> str:
    moved = root()
    return os.path.join(moved, "lib") if moved else DEFAULT_STATE_DIR


def run_dir() -> str:
    named = _named(RUN_DIR_ENV)
    if named:
        return named
    moved = root()
    return os.path.join(moved, "run") if moved else DEFAULT_RUN_DIR


def guest_dir() -> str:
    return _named(GUEST_DIR_ENV) or os.path.join(state_dir(), "guest")


def template_dir() -> str:
    return _named(TEMPLATE_DIR_ENV) or os.path.join(state_dir(), "templates")


def cache_dir() -> str:
    return _named(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR


def tools_dir() -> str:
    return _named(TOOLS_DIR_ENV) or os.path.join(cache_dir(), "tools")


def image_cache_dir() -> str:
    return _named(IMAGE_CACHE_ENV) or os.path.join(cache_dir(), "images")


def check_socket_path(path: str | os.PathLike[str], what: str = "a unix socket") -> None:
    """SocketPathTooLong, naming the path, its length and the fix, if `path` cannot be
    bound (sun_path holds 107 bytes and a NUL)."""
    length = len(os.fsencode(path))
    if length > UNIX_SOCKET_PATH_MAX_BYTES:
        raise SocketPathTooLong(
            f"{what} would be {os.fsdecode(path)} ({length} bytes): a unix socket's path "
            f"may have at most {UNIX_SOCKET_PATH_MAX_BYTES} bytes; set {ROOT_ENV} (or "
            f"{RUN_DIR_ENV}) to a shorter directory"
        )


def check_run_dir() -> None:
    """SocketPathTooLong if the VMs' sockets under the run directory would be too long."""
    check_socket_path(run_dir() + VM_SOCKET_SUFFIX, "a VM's socket under the run directory")
