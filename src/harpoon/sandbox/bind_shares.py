"""Host paths bound into the container as shares of their own: for hosts that cannot
bind mount (macOS: containerd's core/mount is not implemented there).

The other way (harpoon.sandbox.binds) binds each source on the host under the VM's one
share. Here the host mounts nothing: each bind's host directory is a share device of the
VM of its own (a `Share` tagged `bind<n>`, planned with the VM, since vfkit's and VZ's
shares are fixed when the VM boots), the guest mounts it at GUEST_BINDS/<tag> at Create,
and crun bind-mounts that (or the one file in it) into the container with the spec's
options, as in the other way.

- A directory is shared itself. A file is shared through its parent directory (a
  share is a directory), and crun binds the one file out of it; file binds from one
  directory with the same read-only flag share one device. As nerdbox does
  (containerd/nerdbox internal/shim/task/mount.go `bindMounter`, docs/bind-mounts.md),
  and with the same cost: the guest's kernel can reach the file's siblings, though
  the container sees the file alone.
- Read-only is enforced in the guest: the share is mounted `ro` there, so a write in
  the container fails with EROFS (crun's `ro` bind too), and the guest's own mount is
  read-only whatever the container remounts. vfkit's shares are always writable on
  the host side (crc-org/vfkit pkg/config/virtio.go: no read-only option), so nothing
  below the guest's kernel holds it, unlike the host's read-only bind of the other way.
- Sources are resolved (symlinks followed) when planned: the share must be the real
  directory, not a link the guest would follow into its own tree.
- A source's sub-mounts are whatever the share's server shows (9p and virtiofsd show
  them), for `bind` as for `rbind`.
- The share's filesystem is the VM's (9p or virtiofs, as for the rootfs share:
  harpoon.sandbox.plan, and vfkit serves virtiofs alone: its backend's `fit`).
- A VM with bind shares has a layout of its own: it boots cold and no template is made
  for it (harpoon.sandbox.plan); a container without binds is not affected.

Nothing is left on the host: the guest's mounts die with the VM, and a virtiofs share's
virtiofsd is the VMM's helper (ended with it: harpoon.vmm.leftovers).

Which way a host takes: `mode()`, HARPOON_BIND_SHARES. This module must import nothing
that loads asyncio or protobuf (a shim plans before it loads them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harpoon import linux
from harpoon.vmm.base import VMError
from harpoon.vmm.devices import Share

if TYPE_CHECKING:
    from harpoon.sandbox.agent_client import AgentClient
    from harpoon.vmm.devices import ShareFs

#: "1": binds as shares of their own (the only way on a host without bind mounts);
#: "0": bound on the host under the VM's share; unset or empty: the host's way.
ENV = "HARPOON_BIND_SHARES"
TAG_PREFIX = "bind"
GUEST_BINDS = "/run/harpoon/binds"


def enabled() -> bool:
    """Whether host binds become shares of their own: on a host that cannot bind mount,
    or when HARPOON_BIND_SHARES=1 asks for it (the Mac's way, taken on Linux)."""
    setting = os.environ.get(ENV, "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"{ENV}={setting!r}: use 1 (binds as shares) or 0 (host bind mounts)")
    if setting == "0" and not linux.HAS_BIND_MOUNTS:
        raise ValueError(f"{ENV}=0: this host ({os.uname().sysname}) cannot bind mount")
    return setting == "1" or not linux.HAS_BIND_MOUNTS


@dataclass(frozen=True)
class BindShare:
    """A share device of the VM holding host binds: a directory bound whole, or the
    directory of the files bound out of it."""

    tag: str
    host_dir: Path
    readonly: bool

    @property
    def guest_dir(self) -> str:
        """Where the guest mounts it."""
        return f"{GUEST_BINDS}/{self.tag}"

    def device(self) -> Share:
        """The VM's device for it, read-only on the host side too where the backend can
        make it so (QEMU's 9p and virtiofsd): a file's bind shares its whole directory
        (`--net-host`'s /etc/hosts shares the host's /etc), which nothing in the guest
        may then write, not even its kernel. vfkit has no read-only share: its backend
        makes the share writable, and the guest's read-only mount (`mount`) is then
        all that holds."""
        return Share(self.tag, self.host_dir, read_only=self.readonly)


def plan_bind(
    planned: Sequence[BindShare], source: Path, directory: bool, readonly: bool
) -> tuple[BindShare, str]:
    """The share that serves source (one of planned, or a new one the caller adds) and
    where the guest sees source through it (crun's bind source). source exists, and is
    a directory or a regular file as `directory` says."""
    resolved = Path(os.path.realpath(source))
    host_dir = resolved if directory else resolved.parent
    for share in planned:
        if share.host_dir == host_dir and share.readonly == readonly:
            break
    else:
        share = BindShare(f"{TAG_PREFIX}{len(planned)}", host_dir, readonly)
    return share, share.guest_dir if directory else f"{share.guest_dir}/{resolved.name}"


def is_bind_share(share: Share) -> bool:
    """Whether a device of a VM's config is a bind share (its tag says so: harpoon
    names the VM's shares)."""
    return share.tag.startswith(TAG_PREFIX)


def mount_options(fs: ShareFs, readonly: bool) -> list[str]:
    """The guest's mount options for a bind share served as fs."""
    from harpoon.sandbox.rootfs import NINEP_OPTIONS

    # 9p as the rootfs share: nothing cached but mmap's pages, so the guest reads what
    # the host wrote last (nerdctl rewrites /etc/hosts); virtiofsd caches nothing.
    options = list(NINEP_OPTIONS) if fs == "9p" else []
    return [*options, "ro"] if readonly else options


async def mount(agent: AgentClient, shares: Sequence[BindShare], served: Sequence[Share]) -> None:
    """Mounts each bind share in the guest at its guest_dir, as the VM serves it
    (`served`: the VM's shares; a share it lacks is an error of the plan's)."""
    fs_of = {share.tag: share.fs for share in served}
    for share in shares:
        fs = fs_of.get(share.tag)
        if fs is None:
            raise VMError(f"the VM has no share {share.tag!r} for {share.host_dir}")
        await agent.mount(share.tag, share.guest_dir, fs, mount_options(fs, share.readonly))
