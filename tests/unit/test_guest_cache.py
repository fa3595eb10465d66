"""Content addressing of guest images: what changes the digest, and finding a built image."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from harpoon.guest import build, cache, debian
from harpoon.guest import lock as locks

KERNEL = debian.DebPackage(
    "linux-image-6.1.0-9-amd64", "6.1.1-1", "amd64", "pool/k.deb", "a" * 64, suite="bookworm"
)
BUSYBOX = debian.DebPackage(
    "busybox-static", "1:1.35", "amd64", "pool/b.deb", "b" * 64, suite="bookworm"
)
SUITES = ("bookworm",)


def source_tree(root: Path) -> Path:
    for relative in ("__init__.py", "agent/main.py", "ttrpc/codec.py", "api/x_pb2.py"):
        (root / "harpoon" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "harpoon" / relative).write_text(f"# {relative}\n")
    (root / "harpoon/shim").mkdir()
    (root / "harpoon/shim/cli.py").write_text("# host only\n")
    (root / "harpoon/api/regen.py").write_text("# host only\n")
    return root


def digest(packages: list[debian.DebPackage], wheel: Path, sources: Path) -> str:
    return cache.digest_of(build.build_inputs("amd64", packages, wheel, sources))


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    path = tmp_path / "protobuf-7.36.2-py3-none-any.whl"
    path.write_bytes(b"wheel")
    return path


def test_the_digest_is_stable_when_nothing_changes(tmp_path: Path, wheel: Path) -> None:
    sources = source_tree(tmp_path / "src")

    assert digest([KERNEL, BUSYBOX], wheel, sources) == digest([KERNEL, BUSYBOX], wheel, sources)


def test_the_digest_changes_with_a_package_version(tmp_path: Path, wheel: Path) -> None:
    sources = source_tree(tmp_path / "src")
    newer = debian.DebPackage(**{**KERNEL.__dict__, "version": "6.1.2-1", "sha256": "c" * 64})

    assert digest([KERNEL, BUSYBOX], wheel, sources) != digest([newer, BUSYBOX], wheel, sources)


def test_the_digest_changes_with_the_agent_source(tmp_path: Path, wheel: Path) -> None:
    sources = source_tree(tmp_path / "src")
    before = digest([KERNEL], wheel, sources)

    (sources / "harpoon/agent/main.py").write_text("import json\n")

    assert digest([KERNEL], wheel, sources) != before


def test_the_digest_changes_with_the_protobuf_wheel(tmp_path: Path, wheel: Path) -> None:
    sources = source_tree(tmp_path / "src")
    before = digest([KERNEL], wheel, sources)

    wheel.write_bytes(b"another wheel")

    assert digest([KERNEL], wheel, sources) != before


def test_the_digest_ignores_harpoon_code_that_stays_on_the_host(
    tmp_path: Path, wheel: Path
) -> None:
    sources = source_tree(tmp_path / "src")
    before = digest([KERNEL], wheel, sources)

    (sources / "harpoon/shim/cli.py").write_text("# changed\n")
    (sources / "harpoon/api/regen.py").write_text("# changed\n")

    assert digest([KERNEL], wheel, sources) == before


def test_finding_an_unbuilt_guest_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(cache.GuestNotBuiltError, match="harpoon guest build --arch arm64"):
        cache.find_guest("arm64", tmp_path)


def test_a_second_build_with_unchanged_inputs_is_instant_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No apt, no pip, no hashing of big files: the lock, the wheel and the manifest."""
    cache_dir, guest_dir, lock_dir = tmp_path / "cache", tmp_path / "guest", tmp_path / "locks"
    sources = source_tree(tmp_path / "src")
    requested = tuple(build.requested_packages("amd64"))
    locks.write(lock_dir / "amd64.json", locks.Lock(requested, SUITES, (KERNEL, BUSYBOX)), "amd64")
    wheels = cache_dir / "wheels"
    wheel = wheels / "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl"
    (wheels / wheel.stem / build.UPB_EXTENSION).parent.mkdir(parents=True)
    (wheels / wheel.stem / build.UPB_EXTENSION).write_bytes(b"\x7fELF")
    wheel.write_bytes(b"wheel")
    monkeypatch.setattr(build, "protobuf_version", lambda: "7.36.2")
    inputs = build.build_inputs("amd64", [KERNEL, BUSYBOX], wheel, sources)
    built = cache.image_dir("amd64", cache.digest_of(inputs), guest_dir)
    built.mkdir(parents=True)
    manifest = {
        "arch": "amd64",
        "digest": cache.digest_of(inputs),
        "kernel_release": "6.1.0-9-amd64",
        "kernel": "vmlinux",
        "initrd": "initrd.cpio",
        "floor": "floor.cpio",
    }
    (built / cache.MANIFEST_NAME).write_text(json.dumps(manifest))
    messages: list[str] = []

    started = time.monotonic()
    image = build.build_guest(
        "amd64", cache_dir=cache_dir, guest_dir=guest_dir, source_dir=sources,
        lock_dir=lock_dir, report=messages.append,
    )  # fmt: skip

    assert time.monotonic() - started < 1.0
    assert any("up to date" in m for m in messages)
    assert image == cache.find_guest("amd64", guest_dir)
    assert image.kernel == built / "vmlinux"
    assert image.kernel_release == "6.1.0-9-amd64"
    floor = cache.find_guest("amd64", guest_dir, which="floor")
    assert floor.initrd == built / "floor.cpio"
    assert floor.kernel == image.kernel


def test_packages_added_to_the_list_are_resolved_alone_and_the_locked_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = tmp_path / "locks/amd64.json"
    requested = (build.KERNEL_METAPACKAGE["amd64"], "busybox-static")
    locks.write(lock, locks.Lock(requested, SUITES, (KERNEL, BUSYBOX)), "amd64")
    asked: list[list[str]] = []

    class FakeApt:
        def __init__(self, root: Path, arch: str) -> None:
            pass

        def update(self) -> None:
            pass

        def show(self, names: list[str]) -> list[debian.DebPackage]:
            asked.append(list(names))
            return [debian.DebPackage(n, "1", "amd64", f"pool/{n}.deb", "c" * 64) for n in names]

        def with_suites(
            self, packages: list[debian.DebPackage], preferred: tuple[str, ...]
        ) -> list[debian.DebPackage]:
            return [dataclasses.replace(p, suite="bookworm") for p in packages]

    monkeypatch.setattr(build.debian, "PrivateApt", FakeApt)
    monkeypatch.setattr(build, "has_apt", lambda: True)
    monkeypatch.setattr(build, "BASE_PACKAGES", ("busybox-static", "crun"))
    monkeypatch.setattr(build, "UPB_PACKAGES", ())
    monkeypatch.setattr(build, "OCI_RUNTIME_PACKAGES", ("libyajl2",))
    monkeypatch.setattr(build, "NETFILTER_PACKAGES", ())

    packages = build.resolve_packages(
        "amd64", tmp_path, refresh=False, report=lambda _: None, lock_file=lock, method="apt"
    )

    assert asked == [["crun", "libyajl2"]]
    assert [p.name for p in packages] == [KERNEL.name, "busybox-static", "crun", "libyajl2"]
    assert packages[:2] == [KERNEL, BUSYBOX]
    written = locks.read(lock)
    assert written is not None
    assert list(written.requested) == build.requested_packages("amd64")
    assert written.packages == tuple(packages)
    assert {p.suite for p in written.packages[2:]} == {"bookworm"}


def test_pruning_keeps_the_newest_images_and_always_the_current_one(tmp_path: Path) -> None:
    directories = []
    for index in range(5):
        directory = tmp_path / "amd64" / f"image{index}"
        directory.mkdir(parents=True)
        (directory / cache.MANIFEST_NAME).write_text("{}")
        os.utime(directory / cache.MANIFEST_NAME, (1000 + index, 1000 + index))
        directories.append(directory)
    cache.set_current("amd64", directories[0], tmp_path)

    removed = cache.prune("amd64", tmp_path, keep=2)

    assert sorted(removed) == directories[1:4]
    assert [d.exists() for d in directories] == [True, False, False, False, True]


def test_apt_names_the_suite_of_each_locked_version_preferring_the_lists_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apt-cache madison`'s lines (here from a stand-in apt-cache on PATH) give the suite
    the lock records; a version two suites list gets the first of the preferred order."""
    madison = (
        "    zlib1g | 1:1.2.13.dfsg-1+deb12u1 | http://m.example/debian-security "
        "bookworm-security/main amd64 Packages\n"
        "    zlib1g | 1:1.2.13.dfsg-1 | http://m.example/debian bookworm/main amd64 Packages\n"
        "     libc6 | 2.36-9+deb12u14 | http://m.example/debian bookworm-updates/main amd64 "
        "Packages\n"
        "     libc6 | 2.36-9+deb12u14 | http://m.example/debian bookworm/main amd64 Packages\n"
    )
    (tmp_path / "madison.txt").write_text(madison)
    (tmp_path / "apt-cache").write_text(f"#!/bin/sh\ncat {tmp_path / 'madison.txt'}\n")
    (tmp_path / "apt-cache").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    apt = debian.PrivateApt(tmp_path / "apt", "amd64")
    zlib = debian.DebPackage("zlib1g", "1:1.2.13.dfsg-1+deb12u1", "amd64", "pool/z.deb", "d" * 64)
    libc = debian.DebPackage("libc6", "2.36-9+deb12u14", "amd64", "pool/c.deb", "e" * 64)

    named = apt.with_suites([zlib, libc], build.DEBIAN_SUITES)

    assert [p.suite for p in named] == ["bookworm-security", "bookworm"]
    with pytest.raises(debian.DebianError, match=r"lists no suite for libc6 2\.36-9\+deb12u7"):
        apt.with_suites([dataclasses.replace(libc, version="2.36-9+deb12u7")])
