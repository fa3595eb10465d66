"""A deterministic writer (and a reader, for tests) of the cpio "newc" format of initramfs.

The same entries always give the same bytes: entries are sorted by path, parent
directories are added, inode numbers count up in that order, every mtime is
`FIXED_MTIME_S` and every owner is root. Paths are relative to the guest's root and
never start with "/". This module knows the archive format only, not what goes in it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CPIO_NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
FIXED_MTIME_S = 0
_HEADER_BYTES = 110
_ALIGN_BYTES = 4


@dataclass(frozen=True)
class Entry:
    """One archive member: a regular file (data), a symlink (target), a directory or a
    device node (mode with S_IFCHR/S_IFBLK and rdev)."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % _ALIGN_BYTES)


def _header(ino: int, entry: Entry, name_bytes: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if entry.is_dir else 1,
        FIXED_MTIME_S,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        name_bytes,
        0,  # check
    )
    return CPIO_NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def with_parents(entries: Iterable[Entry]) -> dict[str, Entry]:
    """Entries by path, with a 0755 directory added for each missing parent."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        if entry.path.startswith("/") or not entry.path:
            raise ValueError(f"initramfs path must be relative and non-empty: {entry.path!r}")
        by_path[entry.path] = entry
    for path in list(by_path):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            by_path.setdefault(parent, directory(parent))
    return by_path


def write(entries: Iterable[Entry]) -> bytes:
    """The newc archive of `entries` (later entries with the same path win)."""
    chunks: list[bytes] = []
    offset = 0
    by_path = with_parents(entries)
    members = [by_path[path] for path in sorted(by_path)]
    members.append(Entry(TRAILER_NAME, 0))
    for ino, entry in enumerate(members, start=1):
        name = entry.path.encode() + b"\0"
        header = _header(0 if entry.path == TRAILER_NAME else ino, entry, len(name))
        head = header + name
        head += _pad(offset + len(head))
        chunks.append(head)
        offset += len(head)
        chunks.append(entry.data + _pad(len(entry.data)))
        offset += len(entry.data) + len(_pad(len(entry.data)))
    return b"".join(chunks)


def read(archive: bytes) -> Mapping[str, Entry]:
    """Parse a newc archive back into entries by path (stops at the trailer)."""
    result: dict[str, Entry] = {}
    offset = 0
    while True:
        if archive[offset : offset + 6] != CPIO_NEWC_MAGIC:
            raise ValueError(f"bad cpio newc magic at offset {offset}")
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmajor, rminor, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_start = offset + _HEADER_BYTES
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += -data_start % _ALIGN_BYTES
        if name == TRAILER_NAME:
            return result
        data = archive[data_start : data_start + filesize]
        result[name] = Entry(name, mode, data, (rmajor, rminor))
        offset = data_start + filesize
        offset += -offset % _ALIGN_BYTES
