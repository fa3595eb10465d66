"""The busybox OCI image builder: reproducible bytes and self-consistent digests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from harpoon.devenv.images import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_LAYER,
    build_busybox_image,
    build_layer,
    build_layout,
    ref_tag,
)

FAKE_BUSYBOX = b"\x7fELF not really busybox"
APPLETS = ["sh", "ls", "echo", "busybox"]
REF = "docker.io/library/busybox:test"
BUSYBOX = Path("/bin/busybox")


def read_layout(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def blob(files: dict[str, bytes], digest: str) -> bytes:
    data = files["blobs/sha256/" + digest.removeprefix("sha256:")]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


def test_layer_holds_busybox_its_applet_links_and_the_user_database() -> None:
    with tarfile.open(fileobj=io.BytesIO(build_layer(FAKE_BUSYBOX, APPLETS))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("bin/busybox").read() == FAKE_BUSYBOX  # type: ignore[union-attr]
        assert b"nobody" in tar.extractfile("etc/passwd").read()  # type: ignore[union-attr]
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["bin/busybox"].isfile() and members["bin/busybox"].mode == 0o755
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert {m.mtime for m in members.values()} == {0}
    assert {m.uid for m in members.values()} == {0}


def test_layout_digests_chain_from_index_to_layer() -> None:
    layout = build_layout(build_layer(FAKE_BUSYBOX, APPLETS), REF, "amd64")
    [entry] = json.loads(layout.index)["manifests"]
    assert entry["digest"] == layout.manifest.digest
    assert entry["annotations"] == {ANNOTATION_CONTAINERD_NAME: REF, ANNOTATION_REF_NAME: "test"}
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest = json.loads(layout.manifest.data)
    assert manifest["config"]["digest"] == layout.config.digest
    assert manifest["layers"] == [layout.layer.descriptor()]
    assert manifest["layers"][0]["mediaType"] == MEDIA_TYPE_LAYER
    config = json.loads(layout.config.data)
    # The layer is uncompressed, so its diff ID is its digest.
    assert config["rootfs"]["diff_ids"] == [layout.layer.digest]
    assert config["config"]["Cmd"] == ["sh"]


def test_layout_is_deterministic() -> None:
    first = build_layout(build_layer(FAKE_BUSYBOX, APPLETS), REF, "amd64")
    second = build_layout(build_layer(FAKE_BUSYBOX, list(reversed(APPLETS))), REF, "amd64")
    assert first == second


@pytest.mark.parametrize(
    ("ref", "tag"),
    [("docker.io/library/busybox:harpoon", "harpoon"), ("localhost:5000/bb", "latest")],
)
def test_ref_tag(ref: str, tag: str) -> None:
    assert ref_tag(ref) == tag


@pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is not installed")
def test_busybox_tarball_is_reproducible_and_self_consistent(tmp_path: Path) -> None:
    first = build_busybox_image(tmp_path / "a", REF)
    second = build_busybox_image(tmp_path / "b", REF)
    assert first.read_bytes() == second.read_bytes()
    assert build_busybox_image(tmp_path / "a", REF) == first  # cached
    files = read_layout(first)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    [entry] = json.loads(files["index.json"])["manifests"]
    manifest = json.loads(blob(files, entry["digest"]))
    layer = blob(files, manifest["layers"][0]["digest"])
    config = json.loads(blob(files, manifest["config"]["digest"]))
    assert config["architecture"] == "amd64"
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        assert tar.extractfile("bin/busybox").read() == BUSYBOX.read_bytes()  # type: ignore[union-attr]
        assert tar.getmember("bin/sh").linkname == "busybox"
