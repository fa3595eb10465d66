"""Reading the host's /proc for the memory figures: shims, their QEMU children, RSS.

Read-only: nothing here signals or removes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.host import ShimProcess

KIB_PER_MIB = 1024


def shim_of(daemon: Containerd, container_id: str) -> ShimProcess | None:
    """The shim process serving `container_id` for this daemon (matched by its `-id`)."""
    for shim in daemon.shims():
        if shim.flag("id") == container_id:
            return shim
    return None


def children(pid: int) -> list[int]:
    """The direct children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def argv0_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return os.path.basename(os.fsdecode(raw.split(b"\0", 1)[0]))


def qemu_child(shim_pid: int) -> int | None:
    """The `qemu-system-*` child of a harpoon shim (its container's VM)."""
    for pid in children(shim_pid):
        if argv0_name(pid).startswith("qemu-system-"):
            return pid
    return None


def rss_mib(pid: int) -> float | None:
    """Resident set size of a live process, in MiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / KIB_PER_MIB
    except (OSError, ValueError, IndexError):
        pass
    return None
