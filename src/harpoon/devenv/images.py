"""Builds the busybox OCI image the tests run, from Debian's busybox-static, offline.

The result is an OCI image-layout tarball (`oci-layout`, `index.json`, `blobs/sha256/…`)
that `ctr image import` accepts on containerd 1.6 and 2.x. It has one uncompressed layer:
/bin/busybox, a symlink in /bin for each applet, /etc/passwd and /etc/group (root and
nobody), /root and /tmp. Every byte is a function of the busybox binary, its applet list,
the reference and the architecture, so the same inputs give the same digests; the
tarball is cached under that key.

This module never talks to a registry or a daemon.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harpoon import dirs
from harpoon.guest.cache import host_arch
from harpoon.guest.elf import ElfError, interpreter

#: Bump when the image layout changes, so cached tarballs are rebuilt.
IMAGE_FORMAT_REVISION = 1

#: The reference the tests use. Fully qualified: ctr 1.6 and 2.x then register it as is.
BUSYBOX_REF = "docker.io/library/busybox:harpoon"

#: Where Debian's busybox-static puts the binary (/bin is /usr/bin on merged-/usr hosts).
DEFAULT_BUSYBOX = Path("/bin/busybox")

MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: A fixed timestamp for every file and the config, for reproducibility.
EPOCH = 0
EPOCH_RFC3339 = "1970-01-01T00:00:00Z"

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"

_ELF_MACHINE = {62: "amd64", 183: "arm64"}  # EM_X86_64, EM_AARCH64


class ImageBuildError(RuntimeError):
    """The busybox image could not be built from what is installed."""


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob of the image layout."""

    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        size = len(self.data)
        return {"mediaType": self.media_type, "digest": self.digest, "size": size, **extra}


def elf_arch(data: bytes) -> str:
    """The OCI architecture of an ELF executable, from its e_machine field."""
    machine = int.from_bytes(data[18:20], "little")
    return _ELF_MACHINE.get(machine, f"elf-machine-{machine}")


def busybox_applets(busybox: Path) -> list[str]:
    """The applet names `busybox --list` prints (the binary must run on this host)."""
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted({name for name in out.stdout.split() if name and "/" not in name})


def tar_info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_bytes(
    entries: list[tuple[tarfile.TarInfo, bytes | None]], format: int = tarfile.USTAR_FORMAT
) -> bytes:
    buf = io.BytesIO()
    # USTAR (or GNU): no PAX headers, which would carry varying metadata.
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def build_layer(busybox_bytes: bytes, applets: list[str]) -> bytes:
    """The root filesystem layer as an uncompressed tar."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def directory(name: str, mode: int = 0o755) -> None:
        entries.append((tar_info(name, tarfile.DIRTYPE, mode), None))

    def regular(name: str, data: bytes, mode: int) -> None:
        entries.append((tar_info(name, tarfile.REGTYPE, mode, size=len(data)), data))

    directory("bin")
    regular("bin/busybox", busybox_bytes, 0o755)
    for applet in sorted(set(applets) - {"busybox"}):
        entries.append((tar_info(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"), None))
    directory("etc")
    regular("etc/group", GROUP.encode(), 0o644)
    regular("etc/passwd", PASSWD.encode(), 0o644)
    directory("root", 0o700)
    directory("tmp", 0o1777)
    return tar_bytes(entries)


def _json_blob(obj: Any, media_type: str) -> Blob:
    # Canonical JSON (sorted keys, no spaces) so that digests are reproducible.
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return Blob(data, media_type)


def ref_tag(ref: str) -> str:
    """The tag of a reference (`docker.io/library/busybox:harpoon` → `harpoon`)."""
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


@dataclass(frozen=True)
class ImageLayout:
    """The blobs and index of a one-manifest OCI image layout."""

    layer: Blob
    config: Blob
    manifest: Blob
    index: bytes
    #: Layers above `layer`, bottom first (a multi-layer image).
    upper_layers: tuple[Blob, ...] = ()

    def blobs(self) -> list[Blob]:
        return [self.layer, *self.upper_layers, self.config, self.manifest]


def build_layout(
    layer_tar: bytes,
    ref: str,
    arch: str,
    upper_layer_tars: Sequence[bytes] = (),
    run_config: dict[str, Any] | None = None,
) -> ImageLayout:
    """Config, manifest and index.json around one uncompressed layer (and any
    `upper_layer_tars` above it, bottom first). `run_config` is the image config's
    `config` (what a container runs by default); busybox's `sh` when not given."""
    layer = Blob(layer_tar, MEDIA_TYPE_LAYER)
    uppers = tuple(Blob(tar, MEDIA_TYPE_LAYER) for tar in upper_layer_tars)
    layers = (layer, *uppers)
    config = _json_blob(
        {
            "architecture": arch,
            "os": "linux",
            "created": EPOCH_RFC3339,
            "config": run_config or {"Env": [f"PATH={IMAGE_PATH}"], "Cmd": ["sh"]},
            # Uncompressed layer: its diff ID is its own digest.
            "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob in layers]},
            "history": [
                {"created": EPOCH_RFC3339, "created_by": "harpoon.devenv.images"} for _ in layers
            ],
        },
        MEDIA_TYPE_CONFIG,
    )
    manifest = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config.descriptor(),
            "layers": [blob.descriptor() for blob in layers],
        },
        MEDIA_TYPE_MANIFEST,
    )
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [
            manifest.descriptor(
                platform={"architecture": arch, "os": "linux"},
                # ctr 1.6 names the image after io.containerd.image.name; without it, it
                # falls back to ref.name (a bare tag, `harpoon`). 2.x's transfer-service
                # import honours the same annotation.
                annotations={ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: ref_tag(ref)},
            )
        ],
    }
    index_data = _json_blob(index, MEDIA_TYPE_INDEX).data
    return ImageLayout(layer, config, manifest, index_data, uppers)


def write_layout_tar(layout: ImageLayout, out: Path) -> None:
    """Writes the layout as a tarball, atomically (readers never see a partial file)."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (tar_info("blobs", tarfile.DIRTYPE, 0o755), None),
        (tar_info("blobs/sha256", tarfile.DIRTYPE, 0o755), None),
    ]
    for blob in layout.blobs():
        name = "blobs/sha256/" + blob.digest.split(":", 1)[1]
        entries.append((tar_info(name, tarfile.REGTYPE, 0o644, size=len(blob.data)), blob.data))
    for name, data in (
        ("index.json", layout.index),
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
    ):
        entries.append((tar_info(name, tarfile.REGTYPE, 0o644, size=len(data)), data))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tar_bytes(entries))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_busybox_image(
    out_dir: Path,
    ref: str = BUSYBOX_REF,
    arch: str | None = None,
    *,
    busybox: Path = DEFAULT_BUSYBOX,
    applets: list[str] | None = None,
) -> Path:
    """An OCI image-layout tarball of busybox named `ref`, in `out_dir`; cached.

    `arch` defaults to the busybox binary's own architecture and must match it. A foreign
    busybox (e.g. arm64 from `apt-get download busybox-static:arm64`) cannot list its
    applets here: pass `applets`, or the host busybox's list is used.
    """
    try:
        busybox_bytes = busybox.read_bytes()
    except OSError as e:
        raise ImageBuildError(f"cannot read {busybox}: {e}; apt-get install busybox-static") from e
    try:
        static = interpreter(busybox_bytes, str(busybox)) is None
    except ElfError as e:
        raise ImageBuildError(str(e)) from e
    binary_arch = elf_arch(busybox_bytes)
    if not static:
        raise ImageBuildError(
            f"{busybox} is dynamically linked and would not run in an image without libc; "
            "apt-get install busybox-static"
        )
    arch = arch or binary_arch
    if arch != binary_arch:
        raise ImageBuildError(f"{busybox} is an {binary_arch} binary, not {arch}")
    if applets is None:
        runnable = busybox if binary_arch == host_arch() else DEFAULT_BUSYBOX
        applets = busybox_applets(runnable)
    key = hashlib.sha256(
        json.dumps(
            [IMAGE_FORMAT_REVISION, hashlib.sha256(busybox_bytes).hexdigest(), applets, ref, arch]
        ).encode()
    ).hexdigest()[:16]
    out = out_dir / f"busybox-{arch}-{key}.oci.tar"
    if out.exists():
        return out
    layout = build_layout(build_layer(busybox_bytes, applets), ref, arch)
    write_layout_tar(layout, out)
    return out


def host_busybox_layer() -> tuple[bytes, str]:
    """The layer of the host's busybox image and its architecture."""
    busybox_bytes = DEFAULT_BUSYBOX.read_bytes()
    return build_layer(busybox_bytes, busybox_applets(DEFAULT_BUSYBOX)), elf_arch(busybox_bytes)


def build_layered_busybox_image(out: Path, ref: str, upper_layer_tars: Sequence[bytes]) -> Path:
    """The host's busybox image with more layers above it (uncompressed tars, bottom
    first), written to `out` (not cached): for tests of multi-layer rootfs paths."""
    layer, arch = host_busybox_layer()
    write_layout_tar(build_layout(layer, ref, arch, upper_layer_tars), out)
    return out


def default_cache_dir() -> Path:
    """Where built images are cached: next to the tools when writable, else per user."""
    shared = Path(dirs.image_cache_dir())
    if os.access(shared.parent if not shared.exists() else shared, os.W_OK):
        return shared
    return Path(tempfile.gettempdir()) / f"harpoon-images-{os.getuid()}"
