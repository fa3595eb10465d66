"""The guest kernel: a bootable image from Debian's package, and its modules in load order.

x86: Debian ships a compressed bzImage; QEMU boots the ELF `vmlinux` inside it via PVH,
which skips the in-guest decompression (most of the boot time under TCG). We find the
payload, decompress it here and check that the result is ELF. arm64: `vmlinuz` is
already an uncompressed `Image` (magic "ARMd" at 0x38), or a gzip of one.

Modules: each `.ko`'s `.modinfo` names its dependencies (`depends=`, `softdep=pre:`);
`load_order` turns them into an insmod order, dependencies first, deterministically.
This module reads bytes and files; it never loads a module or runs a tool other than
an external decompressor for formats Python lacks (zstd, lz4).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harpoon.guest import elf

ARM64_IMAGE_MAGIC = b"ARMd"
ARM64_IMAGE_MAGIC_OFFSET = 0x38
_BZIMAGE_HEADER_MAGIC = b"HdrS"
_BZIMAGE_HEADER_MAGIC_OFFSET = 0x202
_SECTOR_BYTES = 512


class KernelImageError(ValueError):
    """A kernel image or module could not be understood."""


def _decompress_gzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


def _decompress_xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _decompress_lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _decompress_bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


def _external(tool: str) -> Callable[[bytes], bytes]:
    def decompress(data: bytes) -> bytes:
        path = shutil.which(tool)
        if path is None:
            raise KernelImageError(
                f"the kernel payload is {tool}-compressed and Python cannot decompress it: "
                f"install the `{tool}` package"
            )
        # The payload is followed by other data; the tools stop at the end of the stream
        # but report the trailing garbage as an error, so keep what they wrote.
        done = subprocess.run([path, "-dc"], input=data, capture_output=True, check=False)
        return done.stdout

    return decompress


# Magic bytes of the compressors the kernel's build supports, most likely first.
COMPRESSION_MAGICS: dict[str, tuple[bytes, Callable[[bytes], bytes]]] = {
    "xz": (b"\xfd7zXZ\x00", _decompress_xz),
    "gzip": (b"\x1f\x8b\x08", _decompress_gzip),
    "zstd": (b"\x28\xb5\x2f\xfd", _external("zstd")),
    "lz4": (b"\x02\x21\x4c\x18", _external("lz4")),
    "bzip2": (b"BZh", _decompress_bzip2),
    "lzma": (b"\x5d\x00\x00", _decompress_lzma),
}


def _try_decompress(blob: bytes) -> bytes | None:
    for magic, decompress in COMPRESSION_MAGICS.values():
        if blob.startswith(magic):
            try:
                result = decompress(blob)
            except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
                return None
            return result if result.startswith(elf.ELF_MAGIC) else None
    return None


def extract_vmlinux(image: bytes) -> bytes:
    """The ELF vmlinux inside an x86 bzImage (returned as is when already ELF).

    Uses the boot protocol's payload_offset/payload_length when the setup header is
    there, and otherwise scans for each compressor's magic, like the kernel's own
    scripts/extract-vmlinux.
    """
    if image.startswith(elf.ELF_MAGIC):
        return image
    magic_at = _BZIMAGE_HEADER_MAGIC_OFFSET
    if image[magic_at : magic_at + 4] == _BZIMAGE_HEADER_MAGIC:
        setup_sectors = image[0x1F1] or 4
        payload_offset, payload_bytes = struct.unpack_from("<II", image, 0x248)
        start = (setup_sectors + 1) * _SECTOR_BYTES + payload_offset
        found = _try_decompress(image[start : start + payload_bytes])
        if found is not None:
            return found
    for magic, _ in COMPRESSION_MAGICS.values():
        at = image.find(magic)
        while at >= 0:
            found = _try_decompress(image[at:])
            if found is not None:
                return found
            at = image.find(magic, at + 1)
    raise KernelImageError(
        "no compressed ELF vmlinux found in the kernel image "
        f"(looked for {', '.join(COMPRESSION_MAGICS)})"
    )


def arm64_image(image: bytes) -> bytes:
    """The uncompressed arm64 `Image`, from `vmlinuz` as Debian ships it."""
    if image.startswith(b"\x1f\x8b"):
        image = gzip.decompress(image)
    at = ARM64_IMAGE_MAGIC_OFFSET
    if image[at : at + 4] != ARM64_IMAGE_MAGIC:
        raise KernelImageError(
            f"not an arm64 kernel Image: expected {ARM64_IMAGE_MAGIC!r} at {at:#x}, "
            f"found {image[at : at + 4]!r}"
        )
    return image


def module_name(filename: str) -> str:
    """The kernel's name for a module file: `virtio-mmio.ko.xz` -> `virtio_mmio`."""
    return filename.split(".", 1)[0].replace("-", "_")


def decompress_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing `.ko.xz` / `.ko.gz` / `.ko.zst`."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    result = _try_decompress(data)
    if result is None:
        raise KernelImageError(f"{path}: cannot decompress kernel module")
    return result


MODULE_SIGNATURE_MAGIC = b"~Module signature appended~\n"
_MODULE_SIGNATURE_INFO_BYTES = 12  # struct module_signature; sig_len (be32) ends it


def strip_signature(ko: bytes, what: str = "module") -> bytes:
    """The module without its appended signature.

    The guest kernel does not enforce signatures; checking one costs a hash of the whole
    module and an RSA verification per insmod (~0.1 s of CPU for the boot modules under
    TCG). The modules come from the same Debian package as the kernel and live in the
    initramfs, whose integrity is the image's; an unsigned module only sets taint E.
    """
    if not ko.endswith(MODULE_SIGNATURE_MAGIC):
        return ko
    info_end = len(ko) - len(MODULE_SIGNATURE_MAGIC)
    (signature_bytes,) = struct.unpack_from(">I", ko, info_end - 4)
    end = info_end - _MODULE_SIGNATURE_INFO_BYTES - signature_bytes
    if end <= 0 or not ko.startswith(elf.ELF_MAGIC):
        raise KernelImageError(f"{what}: malformed module signature")
    return ko[:end]


def modinfo(ko: bytes, what: str = "module") -> dict[str, list[str]]:
    """The `.modinfo` key=value pairs of a module (a key may repeat)."""
    raw = elf.section(ko, ".modinfo", what)
    if raw is None:
        raise KernelImageError(f"{what}: no .modinfo section")
    info: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, value = item.decode(errors="replace").split("=", 1)
            info.setdefault(key, []).append(value)
    return info


# Soft dependencies name an alias, which modprobe would resolve through modules.alias;
# the guest has no modprobe, so the few that matter map to their module here.
SOFTDEP_ALIAS_MODULES: Mapping[str, str] = {"crc32c": "crc32c_generic"}


def dependencies(info: Mapping[str, Sequence[str]]) -> list[str]:
    """Modules to load before this one: `depends=` and the `pre:` part of `softdep=`."""
    names = [n for value in info.get("depends", []) for n in value.split(",") if n]
    for softdep in info.get("softdep", []):
        words = softdep.split()
        if "pre:" in words:
            start = words.index("pre:") + 1
            for word in words[start:]:
                if word.endswith(":"):
                    break
                names.append(SOFTDEP_ALIAS_MODULES.get(word, word))
    return [module_name(n) for n in names]


def load_order(targets: Iterable[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Every module `targets` need, each after its dependencies, in a stable order.

    `depends` maps a module to its dependencies; names missing from it are modules
    without dependencies. A cycle is an error.
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise KernelImageError(f"module dependency cycle: {cycle}")
        visiting.append(name)
        for dependency in depends.get(name, ()):
            visit(dependency)
        visiting.pop()
        done.add(name)
        order.append(name)

    for target in targets:
        visit(target)
    return order


@dataclass(frozen=True)
class ModuleSet:
    """The modules chosen from a kernel tree: load order and where each file lives."""

    release: str
    order: tuple[str, ...]
    files: Mapping[str, Path]  # name -> .ko (possibly compressed) in the unpacked tree
    depends: Mapping[str, tuple[str, ...]]  # name -> direct dependencies that are files
    builtin: frozenset[str]  # asked for, but built into the kernel

    def closure(self, name: str) -> list[str]:
        """`name` and what it needs, dependencies first (built-ins left out)."""
        return load_order([name], self.depends)

    def guest_path(self, name: str) -> str:
        """Where the (decompressed) module lives in the guest, relative to /: flat under
        lib/modules/<release>/, as module names are unique."""
        relative = self.files[name].name.split(".ko", 1)[0] + ".ko"
        return f"lib/modules/{self.release}/{relative}"


def select_modules(modules_dir: Path, wanted: Iterable[str]) -> ModuleSet:
    """Resolve `wanted` (names) against an unpacked `lib/modules/<release>` directory."""
    builtin_list = modules_dir / "modules.builtin"
    builtin = (
        {module_name(Path(line).name) for line in builtin_list.read_text().split()}
        if builtin_list.exists()
        else set()
    )
    index = {module_name(p.name): p for p in sorted(modules_dir.rglob("*.ko*"))}
    files: dict[str, Path] = {}
    depends: dict[str, tuple[str, ...]] = {}
    asked_builtin: set[str] = set()

    def resolve(name: str, needed_by: str | None) -> None:
        if name in files or name in asked_builtin:
            return
        if name in builtin:
            asked_builtin.add(name)
            return
        if name not in index:
            if needed_by is not None:
                return  # a soft dependency this kernel lacks; insmod reports a real gap
            raise KernelImageError(
                f"kernel module {name!r} is neither a file nor built in under {modules_dir}"
            )
        files[name] = index[name]
        ko = decompress_module(index[name])
        direct = dependencies(modinfo(ko, str(index[name])))
        for dependency in direct:
            resolve(dependency, name)
        depends[name] = tuple(d for d in direct if d in index and d not in builtin)

    wanted = list(wanted)
    for name in wanted:
        resolve(module_name(name), None)
    order = load_order([module_name(n) for n in wanted if module_name(n) in files], depends)
    return ModuleSet(
        release=modules_dir.name,
        order=tuple(order),
        files=files,
        depends=depends,
        builtin=frozenset(asked_builtin),
    )


#: Kernel options every harpoon guest needs, built in (y) or as a module (m), by backend:
#: the agent's channels (virtio-serial on QEMU, vsock on vfkit), shares, erofs disks.
REQUIRED_OPTIONS = (
    "VIRTIO_CONSOLE",
    "HVC_DRIVER",
    "VSOCKETS",
    "VIRTIO_VSOCKETS",
    "VIRTIO_FS",
    "NET_9P_VIRTIO",
    "EROFS_FS",
    "EXT4_FS",
    "OVERLAY_FS",
    "VIRTIO_BLK",
    "VIRTIO_NET",
)
#: Options that must not be built in: on arm64, the DCC console driver takes hvc0, and
#: Virtualization.framework's only console (a virtio console, `console=hvc0`) would
#: become hvc1 (macos-facts: AOSC issue #16648; nerdbox's kernel config leaves it out).
FORBIDDEN_OPTIONS = {"arm64": ("HVC_DCC",)}


def config_problems(config_text: str, arch: str) -> list[str]:
    """What the kernel's build config (/boot/config-<release>) lacks or has that harpoon's
    guests cannot run with, in words; empty when it fits."""
    values: dict[str, str] = {}
    for line in config_text.splitlines():
        name, equals, value = line.partition("=")
        if equals and name.startswith("CONFIG_"):
            values[name.removeprefix("CONFIG_")] = value
    problems = [
        f"CONFIG_{option} is not set (needs y or m)"
        for option in REQUIRED_OPTIONS
        if values.get(option) not in ("y", "m")
    ]
    problems += [
        f"CONFIG_{option}={values[option]} (must be off)"
        for option in FORBIDDEN_OPTIONS.get(arch, ())
        if values.get(option) in ("y", "m")
    ]
    return problems
