"""Network namespaces pinned by a file, as `ip netns` keeps them: created for a container
whose spec asks for a new one (its VM then runs there, and CNI's hooks configure it),
removed with the container.

`unshare --net=FILE true` makes the namespace and bind-mounts it on FILE, so it outlives
the process that made it; removing is unmounting FILE and deleting it. Nothing here
needs an event loop: the shim's daemon creates the namespace before it has one (its VM
is launched early, in that namespace).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from harpoon import linux

NSENTER = "nsenter"
UNSHARE = "unshare"
COMMAND_TIMEOUT_S = 30.0


class NetnsError(OSError):
    """A namespace could not be made, entered or removed; says which and why."""


def create(path: Path) -> None:
    """A new network namespace pinned at path (which must not exist yet)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except FileExistsError:
        raise NetnsError(f"network namespace {path} exists already") from None
    os.close(fd)
    try:
        run([UNSHARE, f"--net={path}", "true"], f"creating network namespace {path}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    """Unpins the namespace at path and deletes the file; nothing if it is gone already.
    The namespace itself ends once no process (its VM's) is in it."""
    with contextlib.suppress(FileNotFoundError, OSError):
        linux.umount(str(path), linux.MNT_DETACH)
    path.unlink(missing_ok=True)


def is_pinned(path: Path) -> bool:
    """True if path is a namespace file a `create` pinned (and `remove` did not)."""
    return str(path) in linux.mounts_under(str(path))


def run_in(path: Path, argv: Sequence[str], what: str, stdin: bytes | None = None) -> str:
    """argv run in the namespace at path, its output; NetnsError naming `what` if fails."""
    return run([NSENTER, f"--net={path}", "--", *argv], what, stdin)


def run(argv: list[str], what: str, stdin: bytes | None = None) -> str:
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NetnsError(f"{what}: {error}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise NetnsError(f"{what}: `{' '.join(argv)}` failed: {message}")
    return done.stdout.decode(errors="replace")
