"""Host directories, files and sockets that only the user harpoon runs as can reach.

Everything harpoon keeps on the host is a handle on a container or its VM: a QMP
socket drives the VM, the agent and stdio sockets speak for the container, a console
log or a template's memory file holds what the guest had in RAM, a share is a
container's root filesystem, the shim's socket is its Task API. No other user of the
host may reach any of it, so directories are made 0700 and files and sockets 0600,
whatever the umask harpoon was started with (containerd hands its shims its own). A
directory or file that already exists with group or other access (made by an older
harpoon: /run/harpoon was 0755) loses it when harpoon next uses it, because hosts
upgrade in place.

Cheap to import (os only): `shim start` uses it on every container's critical path.
"""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False  # not typing's: `shim start` would load typing for it
if TYPE_CHECKING:
    from _socket import socket

    PathLike = str | os.PathLike[str]

DIR_MODE = 0o700
FILE_MODE = 0o600
# What the owner of a path does not need: group and other access, all of it.
SHARED_BITS = 0o077
# For a child harpoon starts that creates files of its own (the VMM: console log, pid
# file, a template's memory and saved state).
UMASK = 0o077


def directory(path: PathLike) -> None:
    """Makes path a directory only its owner can reach: created 0700 if missing (and
    so are its missing parents: a new /var/lib/harpoon is harpoon's), tightened if it
    is looser. Directories above it that exist already are not touched: they are not
    necessarily harpoon's."""
    path = os.fspath(path)
    _make(path)
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    _tighten(path, info.st_mode)


def _make(path: str) -> None:
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        parent = os.path.dirname(path.rstrip("/"))
        if not parent or parent == path:
            raise
        _make(parent)
        _make(path)


def tighten(path: PathLike) -> None:
    """Takes group and other access away from an existing path (it follows links)."""
    _tighten(path, os.stat(path).st_mode)


def _tighten(path: PathLike, mode: int) -> None:
    if mode & SHARED_BITS:
        os.chmod(path, stat.S_IMODE(mode) & ~SHARED_BITS)


def open_file(path: PathLike, flags: int) -> int:
    """os.open of a file only its owner can reach (created 0600 whatever the umask; an
    existing one is tightened). Never follows a link at path."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        mode = os.fstat(fd).st_mode
        if mode & SHARED_BITS:
            os.fchmod(fd, stat.S_IMODE(mode) & ~SHARED_BITS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: PathLike, data: bytes) -> None:
    """Writes data into path (replacing what it held), a file only its owner can reach."""
    fd = open_file(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_file(path: PathLike) -> bytes:
    """What path holds, tightening it first if an older harpoon left it readable to all."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_mode & SHARED_BITS:
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~SHARED_BITS)
        chunks = []
        while chunk := os.read(fd, max(info.st_size, 4096)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def bind(listener: socket, path: PathLike) -> None:
    """Binds a unix socket at path, 0600 before anyone can connect: call it before
    listen(), in a directory made by `directory` (nobody else can reach the socket
    between bind, which makes it with the umask's mode, and the chmod)."""
    listener.bind(os.fspath(path))
    os.chmod(path, FILE_MODE)
