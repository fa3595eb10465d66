"""Kernel image extraction and module load order, on synthetic images and modules."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from pathlib import Path

import pytest

from harpoon.guest import kernel

FAKE_VMLINUX = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def bzimage(payload: bytes, setup_sectors: int = 4) -> bytes:
    """A minimal bzImage: setup header with HdrS and the payload's offset and length."""
    setup = bytearray((setup_sectors + 1) * 512)
    setup[0x1F1] = setup_sectors
    setup[0x202:0x206] = b"HdrS"
    head_bytes = 0x100  # the decompressor stub before the payload
    struct.pack_into("<II", setup, 0x248, head_bytes, len(payload))
    return bytes(setup) + b"\x90" * head_bytes + payload + struct.pack("<I", len(FAKE_VMLINUX))


@pytest.mark.parametrize(
    "compress",
    [
        lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
        lambda d: gzip.compress(d, mtime=0),
        bz2.compress,
        lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    ],
    ids=["xz", "gzip", "bzip2", "lzma"],
)
def test_vmlinux_is_extracted_from_a_compressed_bzimage(compress: object) -> None:
    assert callable(compress)
    image = bzimage(compress(FAKE_VMLINUX))

    assert kernel.extract_vmlinux(image) == FAKE_VMLINUX


def test_vmlinux_is_found_by_magic_when_the_header_is_missing() -> None:
    image = b"junk\xfd7zXZ" + b"\0" * 100 + lzma.compress(FAKE_VMLINUX, format=lzma.FORMAT_XZ)

    assert kernel.extract_vmlinux(image) == FAKE_VMLINUX


def test_an_elf_image_is_returned_as_is() -> None:
    assert kernel.extract_vmlinux(FAKE_VMLINUX) == FAKE_VMLINUX


def test_an_image_without_a_compressed_elf_is_an_error() -> None:
    with pytest.raises(kernel.KernelImageError, match="no compressed ELF"):
        kernel.extract_vmlinux(bzimage(gzip.compress(b"not an elf")))


def arm64_image() -> bytes:
    image = bytearray(4096)
    image[0x38:0x3C] = b"ARMd"
    return bytes(image)


def test_an_arm64_image_is_checked_and_gunzipped() -> None:
    assert kernel.arm64_image(arm64_image()) == arm64_image()
    assert kernel.arm64_image(gzip.compress(arm64_image())) == arm64_image()
    with pytest.raises(kernel.KernelImageError, match="ARMd"):
        kernel.arm64_image(bytes(4096))


def test_dependencies_come_before_the_modules_that_need_them() -> None:
    depends = {
        "9p": ["9pnet", "netfs", "fscache"],
        "fscache": ["netfs"],
        "9pnet_virtio": ["9pnet", "virtio_ring", "virtio"],
        "virtio": ["virtio_ring"],
    }

    order = kernel.load_order(["9p", "9pnet_virtio"], depends)

    assert order == ["9pnet", "netfs", "fscache", "9p", "virtio_ring", "virtio", "9pnet_virtio"]


def test_a_dependency_cycle_is_an_error() -> None:
    with pytest.raises(kernel.KernelImageError, match="a -> b -> a"):
        kernel.load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_depends_and_soft_predependencies_are_read_from_modinfo() -> None:
    info = {"depends": ["virtio-ring,virtio"], "softdep": ["pre: crc32c post: foo"]}

    assert kernel.dependencies(info) == ["virtio_ring", "virtio", "crc32c_generic"]


def fake_module(name: str, depends: str) -> bytes:
    """An ELF64 with section headers: null, .modinfo, .shstrtab."""
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    header_bytes = 64
    modinfo_at = header_bytes
    shstrtab_at = modinfo_at + len(modinfo)
    sections_at = shstrtab_at + len(shstrtab)
    header = bytearray(header_bytes)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", header, 0x28, sections_at)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)
    sections = bytes(64)
    sections += struct.pack("<IIQQQQ", 1, 1, 0, 0, modinfo_at, len(modinfo)).ljust(64, b"\0")
    sections += struct.pack("<IIQQQQ", 10, 3, 0, 0, shstrtab_at, len(shstrtab)).ljust(64, b"\0")
    return bytes(header) + modinfo + shstrtab + sections


def test_modinfo_is_read_from_the_modinfo_section() -> None:
    info = kernel.modinfo(fake_module("virtio_mmio", "virtio,virtio_ring"))

    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["name"] == ["virtio_mmio"]


def test_an_appended_module_signature_is_stripped() -> None:
    module = fake_module("virtio_mmio", "virtio")
    signature = b"\x30\x82" + b"s" * 510
    info = struct.pack(">BBBBBxxxI", 0, 0, 2, 0, 0, len(signature))  # PKCS#7, sig_len
    signed = module + signature + info + kernel.MODULE_SIGNATURE_MAGIC

    assert kernel.strip_signature(signed) == module
    assert kernel.strip_signature(module) == module


def test_modules_are_selected_from_a_tree_with_compressed_and_builtin_modules(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "lib/modules/6.1.0-9-amd64"
    (tree / "kernel/drivers/virtio").mkdir(parents=True)
    (tree / "kernel/drivers/virtio/virtio_mmio.ko").write_bytes(
        fake_module("virtio_mmio", "virtio")
    )
    (tree / "kernel/drivers/virtio/virtio.ko.xz").write_bytes(
        lzma.compress(fake_module("virtio", "virtio_ring"), format=lzma.FORMAT_XZ)
    )
    (tree / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")

    selected = kernel.select_modules(tree, ["virtio_mmio", "virtio_ring"])

    assert selected.order == ("virtio", "virtio_mmio")
    assert selected.builtin == frozenset({"virtio_ring"})
    assert selected.guest_path("virtio") == "lib/modules/6.1.0-9-amd64/virtio.ko"
    assert kernel.decompress_module(selected.files["virtio"]).startswith(b"\x7fELF")


def test_an_unknown_module_is_an_error(tmp_path: Path) -> None:
    tree = tmp_path / "lib/modules/6.1.0-9-amd64"
    tree.mkdir(parents=True)

    with pytest.raises(kernel.KernelImageError, match="neither a file nor built in"):
        kernel.select_modules(tree, ["nosuch"])


def _config(**options: str) -> str:
    lines = ["# Linux/arm64 6.1 Kernel Configuration"]
    lines += [f"CONFIG_{name}={value}" for name, value in options.items()]
    lines.append("# CONFIG_HVC_DCC is not set")
    return "\n".join(lines) + "\n"


GOOD = {option: "m" for option in kernel.REQUIRED_OPTIONS}


def test_a_kernel_config_with_every_option_fits_both_arches() -> None:
    assert kernel.config_problems(_config(**GOOD), "arm64") == []
    assert kernel.config_problems(_config(**GOOD), "amd64") == []


def test_a_missing_vsock_option_is_named() -> None:
    options = {**GOOD}
    del options["VIRTIO_VSOCKETS"]
    assert kernel.config_problems(_config(**options), "amd64") == [
        "CONFIG_VIRTIO_VSOCKETS is not set (needs y or m)"
    ]


def test_arm64_refuses_the_dcc_console_that_takes_hvc0() -> None:
    """VZ's console is hvc0 only while no DCC driver claims it first."""
    text = _config(**GOOD, HVC_DCC="y")
    assert kernel.config_problems(text, "arm64") == ["CONFIG_HVC_DCC=y (must be off)"]
    assert kernel.config_problems(text, "amd64") == []
