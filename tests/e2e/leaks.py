"""What an e2e test may not leave in its containerd (the `containerd` fixtures check)."""

from __future__ import annotations

import time

from harpoon.devenv.containerd import Containerd

#: How long shims get to exit after their last task is deleted.
SHIM_EXIT_TIMEOUT_S = 10.0


def leaks_of(daemon: Containerd) -> list[str]:
    """What a test left in daemon: tasks, containers, shims (given time to exit), mounts."""
    leaks = []
    if daemon.tasks():
        leaks.append(f"tasks {daemon.tasks()}")
    if daemon.containers():
        leaks.append(f"containers {daemon.containers()}")
    # A shim exits shortly after containerd deletes its last task: give it that time.
    deadline = time.monotonic() + SHIM_EXIT_TIMEOUT_S
    while daemon.shims() and time.monotonic() < deadline:
        time.sleep(0.05)
    if daemon.shims():
        leaks.append(f"shims {[str(s) for s in daemon.shims()]}")
    mounts = daemon.mounts()
    if mounts:
        leaks.append(f"mounts {mounts}")
    return leaks
