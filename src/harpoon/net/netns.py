"""Network namespaces pinned by a file, as `ip netns` keeps them: created for a container
whose spec asks for a new one (its VM then runs there, and CNI's hooks configure it),
removed with the container.

A thread of this process unshares its network namespace (a network namespace is a
thread's) and bind-mounts it on the file, so it outlives the thread; removing is
unmounting the file and deleting it. Nothing here needs an event loop: the shim's daemon
creates the namespace before it has one (its VM is launched early, in that namespace).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from harpoon import linux

NSENTER = "nsenter"
COMMAND_TIMEOUT_S = 30.0


class NetnsError(OSError):
    """A namespace could not be made, entered or removed; says which and why."""


TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # linux/if_tun.h
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def prepare_with_tap(path: Path, owned: bool, tap: str) -> None:
    """The namespace at path (made first if `owned` and not there yet) with a tap
    called `tap` in it, up; idempotent. Done in a thread of its own, which enters the
    namespace (a network namespace is a thread's): no process is started, where `ip`
    would cost a few of them on every container's start."""
    if owned and not is_pinned(path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
        os.close(fd)
        create_in = True
    else:
        create_in = False
    failure: list[BaseException] = []

    def work() -> None:
        try:
            if create_in:
                linux.unshare(linux.CLONE_NEWNET)
                linux.mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", str(path),
                            "", linux.MS_BIND)  # fmt: skip
            else:
                with open(path, "rb") as namespace:
                    linux.setns(namespace.fileno(), linux.CLONE_NEWNET)
            _make_tap_here(tap)
        except BaseException as error:  # reported by the caller's thread
            failure.append(error)

    thread = threading.Thread(target=work, name="netns")
    thread.start()
    thread.join()
    if failure:
        if create_in:
            remove(path)
        raise NetnsError(f"preparing network namespace {path}: {failure[0]}")


def _make_tap_here(name: str) -> None:
    """A persistent tap `name`, up, in this thread's network namespace (kept if there)."""
    import fcntl
    import socket
    import struct

    try:
        socket.if_nametoindex(name)
        exists = True
    except OSError:
        exists = False
    if not exists:
        with open(TUN_DEVICE, "r+b", buffering=0) as tun:
            fcntl.ioctl(
                tun, TUNSETIFF, struct.pack(linux.IFREQ_FLAGS, name.encode(), IFF_TAP | IFF_NO_PI)
            )
            fcntl.ioctl(tun, TUNSETPERSIST, 1)
    linux.set_interface_up(name)


def remove(path: Path) -> None:
    """Unpins the namespace at path and deletes the file; nothing if it is gone already.
    The namespace itself ends once no process (its VM's) is in it."""
    with contextlib.suppress(FileNotFoundError, OSError):
        linux.umount(str(path), linux.MNT_DETACH)
    path.unlink(missing_ok=True)


def is_pinned(path: Path) -> bool:
    """True if path is a namespace file `prepare_with_tap` pinned (and `remove` did not)."""
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
