"""Just enough ELF reading for building the guest: sections, DT_NEEDED and PT_INTERP.

Used to read a kernel module's `.modinfo` and to find the shared libraries a binary
or extension module needs. Only 64-bit little-endian ELF (x86_64 and aarch64) is
supported; anything else is an error that names the file. Never executes anything.
"""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_PT_DYNAMIC = 2
_PT_INTERP = 3
_DT_NULL = 0
_DT_NEEDED = 1
_DT_STRTAB = 5
_PT_LOAD = 1


class ElfError(ValueError):
    """The bytes are not an ELF file this reader understands."""


def _check_header(data: bytes, what: str) -> None:
    if data[:4] != ELF_MAGIC:
        raise ElfError(f"{what}: not an ELF file (magic {data[:4]!r})")
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise ElfError(f"{what}: only 64-bit little-endian ELF is supported")


def section(data: bytes, name: str, what: str = "ELF file") -> bytes | None:
    """The contents of the section called `name`, or None when the file has none."""
    _check_header(data, what)
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for index in range(shnum):
        base = shoff + index * shentsize
        sh_name, _type, _flags, _addr, sh_offset, sh_size = struct.unpack_from(
            "<IIQQQQ", data, base
        )
        headers.append((sh_name, sh_offset, sh_size))
    _, strtab_offset, strtab_size = headers[shstrndx]
    strtab = data[strtab_offset : strtab_offset + strtab_size]
    wanted = name.encode()
    for sh_name, sh_offset, sh_size in headers:
        end = strtab.index(b"\0", sh_name)
        if strtab[sh_name:end] == wanted:
            return data[sh_offset : sh_offset + sh_size]
    return None


def _segments(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, file offset, virtual address, file size) of each program header."""
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    result = []
    for index in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + index * phentsize
        )
        result.append((p_type, p_offset, p_vaddr, p_filesz))
    return result


def interpreter(data: bytes, what: str = "ELF file") -> str | None:
    """The program interpreter (PT_INTERP, the dynamic loader's path), if any."""
    _check_header(data, what)
    for p_type, offset, _vaddr, size in _segments(data):
        if p_type == _PT_INTERP:
            return data[offset : offset + size].rstrip(b"\0").decode()
    return None


def needed(data: bytes, what: str = "ELF file") -> list[str]:
    """The DT_NEEDED sonames of a dynamically linked file, in order ([] when static)."""
    _check_header(data, what)
    segments = _segments(data)
    dynamic = [s for s in segments if s[0] == _PT_DYNAMIC]
    if not dynamic:
        return []
    _, dyn_offset, _, dyn_size = dynamic[0]
    entries: list[tuple[int, int]] = []
    for base in range(dyn_offset, dyn_offset + dyn_size, 16):
        tag, value = struct.unpack_from("<qQ", data, base)
        if tag == _DT_NULL:
            break
        entries.append((tag, value))
    strtab_vaddr = next(value for tag, value in entries if tag == _DT_STRTAB)
    strtab_offset = _vaddr_to_offset(segments, strtab_vaddr, what)
    names = []
    for tag, value in entries:
        if tag == _DT_NEEDED:
            start = strtab_offset + value
            names.append(data[start : data.index(b"\0", start)].decode())
    return names


def _vaddr_to_offset(segments: list[tuple[int, int, int, int]], vaddr: int, what: str) -> int:
    for p_type, offset, seg_vaddr, size in segments:
        if p_type == _PT_LOAD and seg_vaddr <= vaddr < seg_vaddr + size:
            return vaddr - seg_vaddr + offset
    raise ElfError(f"{what}: address {vaddr:#x} is in no loadable segment")
