"""virtiofsd, the host side of a virtiofs share: one process per share of a VM.

A `Share(fs="virtiofs")` is served by a virtiofsd (the Rust one, `cargo install`ed by
scripts/install-deps into the tools cache, pinned: VERSION) that QEMU's
vhost-user-fs device talks to over a unix socket. The launcher binds that socket and
virtiofsd inherits it listening (`--fd`), so QEMU can connect at once; virtiofsd gets
the same parent-death signal as QEMU, exits by itself when QEMU hangs up, is killed
with the VM (harpoon.vmm.qemu), and `shim delete` after a killed shim finds it by the
pid file it leaves in the VM's state directory (harpoon.vmm.leftovers).

Options: `--sandbox=chroot` keeps virtiofsd in the host's mount namespace, chrooted
into the export, so the rootfs and the bind mounts attached under the export after it
started are seen (as QEMU's 9p server sees them); `--cache=never`: nothing is cached
in the guest, so a change on the host (nerdctl rewriting /etc/hosts) is what the next
read returns, as with 9p. `--announce-submounts`: each host mount under the export is
its own mount in the guest (its inode numbers cannot collide with the rootfs's).

Nothing here imports more than os (and shutil, sys): the shim launches its VM before asyncio loads.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from harpoon import dirs
from harpoon.vmm.devices import Share
from harpoon.vmm.leftovers import HELPER_PID_PREFIX

VERSION = "1.14.0"
#: Where scripts/install-deps puts it (harpoon.devenv.tools' cache; the same override).
TOOLS_BINARY = Path(dirs.tools_dir()) / f"virtiofsd-v{VERSION}" / "virtiofsd"
#: Debian's (trixie on) and Fedora's place for it.
SYSTEM_BINARIES = (Path("/usr/libexec/virtiofsd"), Path("/usr/lib/qemu/virtiofsd"))
BINARY_ENV = "HARPOON_VIRTIOFSD"
PID_PREFIX = HELPER_PID_PREFIX
#: --cache: "never" unless HARPOON_VIRTIOFS_CACHE says (for measuring: "auto" caches
#: names and attributes for 1 s, so a host change may be seen that much later).
CACHE_ENV = "HARPOON_VIRTIOFS_CACHE"
CACHE_POLICY = os.environ.get(CACHE_ENV) or "never"


def find(platform: str | None = None) -> str | None:
    """The virtiofsd to run: $HARPOON_VIRTIOFSD, the tools cache's, PATH's, the
    system's; None when there is none, and always on a host that is not Linux
    (`platform`, default this one's): virtiofsd serves Linux's FUSE and namespaces, and
    QEMU's vhost-user memory is a Linux memfd, so no backend serves virtiofs on macOS."""
    if (platform or sys.platform) != "linux":
        return None
    named = os.environ.get(BINARY_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    for candidate in (TOOLS_BINARY, shutil.which("virtiofsd"), *SYSTEM_BINARIES):
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def socket_path(state_dir: Path, share: Share) -> Path:
    return state_dir / f"vfs-{share.tag}.sock"


def pid_file(state_dir: Path, share: Share) -> Path:
    return state_dir / f"{PID_PREFIX}{share.tag}.pid"


def log_file(state_dir: Path, share: Share) -> Path:
    return state_dir / f"virtiofsd-{share.tag}.log"


def command_line(binary: str, share: Share, fd: int) -> list[str]:
    """virtiofsd's argv for share, serving the listening socket fd (pure)."""
    argv = [
        binary,
        f"--fd={fd}",
        f"--shared-dir={share.host_path}",
        "--sandbox=chroot",
        f"--cache={CACHE_POLICY}",
        "--announce-submounts",
        "--log-level=warn",
    ]
    if share.read_only:
        argv.append("--readonly")
    return argv
