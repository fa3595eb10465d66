"""Fetching Debian packages without apt (harpoon.guest.mirror) from a small archive served
on loopback: the chain InRelease (gpgv) -> Packages -> .deb -> lock is followed, and a
file damaged at any link is refused with an error naming it. Also the build's choice of
apt or Python, and `--refresh`'s Python resolver writing the lock."""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.guest import build, debian, mirror, sources
from harpoon.guest import lock as locks
from harpoon.guest.archive import ArchiveError
from harpoon.guest.debian import DebPackage
from tests.prerequisites import unavailable
from tests.unit.fake_debian_archive import Gpg, Suite, gpg_key, make_deb, publish, serve

NOT_VERIFIED = "InRelease signature NOT verified: gpgv/keyring missing"


@pytest.fixture(scope="module")
def signer() -> Iterator[Gpg]:
    """The archive's signing key (gpg in a private home)."""
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        unavailable("gpg and gpgv are needed to sign and check the fake archive")
    with gpg_key("Fake Archive Signing Key <archive@example.invalid>") as gpg:
        yield gpg


@dataclasses.dataclass
class Archive:
    root: Path
    url: str
    requests: list[str]
    bookworm: Suite
    security: Suite
    hello: DebPackage
    patched: DebPackage
    keyring: Path

    def environ(self, keyring: Path | None) -> dict[str, str]:
        environ = {sources.MIRROR_ENV: self.url, sources.SECURITY_MIRROR_ENV: self.url}
        if keyring is not None:
            environ[sources.KEYRING_ENV] = str(keyring)
        return environ

    def publish(self, gpg: Gpg) -> None:
        publish(self.root, self.bookworm, gpg)
        publish(self.root, Suite("bookworm-updates", "amd64"), gpg)  # empty, as it often is
        publish(self.root, self.security, gpg)


@pytest.fixture
def fake(tmp_path: Path, signer: Gpg) -> Iterator[Archive]:
    bookworm, security = Suite("bookworm", "amd64"), Suite("bookworm-security", "amd64")
    hello = bookworm.add("hello", "1.0-1", {"usr/bin/hello": b"#!/bin/sh\necho hello\n"})
    bookworm.add("libfoo1", "2.0-1", {"usr/lib/libfoo.so.1": b"\x7fELF"})
    bookworm.add("linux-image-amd64", "6.1.1-1", {})
    bookworm.debs[-1] = (
        dataclasses.replace(bookworm.debs[-1][0], depends="linux-image-6.1.0-9-amd64 (= 6.1)"),
        bookworm.debs[-1][1],
    )
    bookworm.add("linux-image-6.1.0-9-amd64", "6.1.1-1", {"boot/vmlinuz": b"kernel"})
    patched = security.add("libfoo1", "2.0-1+deb12u1", {"usr/lib/libfoo.so.1": b"\x7fELF2"})
    root = tmp_path / "archive"
    with serve(root) as (url, requests):
        archive = Archive(root, url, requests, bookworm, security, hello, patched, signer.keyring)
        archive.publish(signer)
        yield archive


def fetcher(
    archive: Archive,
    cache: Path,
    messages: list[str] | None = None,
    keyring: Path | str | None = "the archive's",
) -> mirror.Mirror:
    """A Mirror of `archive`, checking signatures with its key (or `keyring`'s; None:
    none configured)."""
    log = messages if messages is not None else []
    environ = archive.environ(archive.keyring if isinstance(keyring, str) else keyring)
    return mirror.Mirror("amd64", cache, report=log.append, environ=environ, apt_sources=[])


def test_a_locked_package_is_fetched_through_the_checked_chain_and_unpacks(
    fake: Archive, signer: Gpg, tmp_path: Path
) -> None:
    messages: list[str] = []
    into = tmp_path / "cache/debs/amd64"

    paths = fetcher(fake, tmp_path / "cache", messages).download([fake.hello, fake.patched], into)

    assert [p.name for p in paths] == [fake.hello.deb_name, fake.patched.deb_name]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] == [
        fake.hello.sha256,
        fake.patched.sha256,
    ]
    assert any("bookworm InRelease: signature verified by gpgv" in m for m in messages)
    assert any("bookworm-security InRelease: signature verified" in m for m in messages)
    assert not any(NOT_VERIFIED in m for m in messages)
    index_hash = [r for r in fake.requests if "/by-hash/SHA256/" in r]
    assert len(index_hash) == 2  # by-hash, as InRelease allows: one index per suite
    assert f"/{fake.hello.filename}" in fake.requests
    debian.extract(paths[0], tmp_path / "root")
    assert (tmp_path / "root/usr/bin/hello").read_bytes() == b"#!/bin/sh\necho hello\n"
    assert sorted(p.name for p in into.iterdir()) == sorted(p.name for p in paths)


def test_cached_debs_are_hashed_again_and_a_damaged_one_fetched_again(
    fake: Archive, signer: Gpg, tmp_path: Path
) -> None:
    into = tmp_path / "cache/debs/amd64"
    fetcher(fake, tmp_path / "cache").download([fake.hello], into)
    fake.requests.clear()

    fetcher(fake, tmp_path / "cache").download([fake.hello], into)
    assert fake.requests == []  # the cached .deb was right: no request at all

    (into / fake.hello.deb_name).write_bytes(b"damaged")
    fetcher(fake, tmp_path / "cache").download([fake.hello], into)
    assert f"/{fake.hello.filename}" in fake.requests
    assert hashlib.sha256((into / fake.hello.deb_name).read_bytes()).hexdigest() == (
        fake.hello.sha256
    )
    assert not any("debian-indexes" in r for r in fake.requests)
    # The index was taken from the cache, by its hash: only InRelease and the .deb again.
    assert [r for r in fake.requests if "Packages" in r or "by-hash" in r] == []


def _tamper_index(fake: Archive) -> Path:
    binary = fake.root / "dists/bookworm/main/binary-amd64"
    forged = (binary / "Packages").read_text().replace("2.0-1", "2.0-2").encode()
    for index in [binary / "Packages.xz", *(binary / "by-hash/SHA256").iterdir()]:
        index.write_bytes(lzma.compress(forged))
    return binary / "Packages.xz"


def test_a_packages_index_that_inrelease_does_not_vouch_for_is_refused(
    fake: Archive, tmp_path: Path
) -> None:
    _tamper_index(fake)
    into = tmp_path / "debs"

    with pytest.raises(ArchiveError, match=r"main/binary-amd64/Packages\.xz: .*refused"):
        fetcher(fake, tmp_path / "cache").download([fake.hello], into)

    assert not any(r.endswith(".deb") for r in fake.requests)
    assert not (tmp_path / "cache/debian-indexes").exists()


@pytest.mark.parametrize("same_size", [True, False])
def test_a_tampered_deb_is_refused_naming_it_and_not_kept(
    fake: Archive, tmp_path: Path, same_size: bool
) -> None:
    pool = fake.root / fake.hello.filename
    original = pool.read_bytes()
    pool.write_bytes(original[:-1] + b"!" if same_size else original + b"trailing")
    into = tmp_path / "debs"

    with pytest.raises(ArchiveError, match=rf"{fake.hello.filename}: .*refused"):
        fetcher(fake, tmp_path / "cache").download([fake.hello], into)

    assert list(into.iterdir()) == []  # neither the file nor a partial one


def test_a_lock_that_the_index_does_not_vouch_for_is_refused(fake: Archive, tmp_path: Path) -> None:
    forged = dataclasses.replace(fake.hello, sha256=hashlib.sha256(b"other").hexdigest())

    with pytest.raises(ArchiveError, match=r"hello 1\.0-1: the bookworm amd64 Packages index"):
        fetcher(fake, tmp_path / "cache").download([forged], tmp_path / "debs")


def test_a_package_the_archive_no_longer_has_says_to_refresh(fake: Archive, tmp_path: Path) -> None:
    old = dataclasses.replace(fake.hello, version="0.9-1")

    with pytest.raises(ArchiveError, match=r"hello 0\.9-1 is not in .*--refresh"):
        fetcher(fake, tmp_path / "cache").download([old], tmp_path / "debs")


def test_an_inrelease_signed_by_another_key_is_refused(
    fake: Archive, signer: Gpg, tmp_path: Path
) -> None:
    with gpg_key("Someone Else <else@example.invalid>") as other:
        fake.publish(other)

    with pytest.raises(ArchiveError, match=r"dists/bookworm/InRelease: signature check failed"):
        fetcher(fake, tmp_path / "cache").download([fake.hello], tmp_path / "d")

    assert not any(r.endswith(".deb") or "by-hash" in r for r in fake.requests)


def test_an_inrelease_changed_after_signing_is_refused(
    fake: Archive, signer: Gpg, tmp_path: Path
) -> None:
    inrelease = fake.root / "dists/bookworm/InRelease"
    inrelease.write_bytes(inrelease.read_bytes().replace(b"Origin: Fake", b"Origin: Evil"))

    with pytest.raises(ArchiveError, match=r"signature check failed.*BAD signature"):
        fetcher(fake, tmp_path / "cache").download([fake.hello], tmp_path / "d")


def test_without_gpgv_the_report_says_plainly_the_signature_was_not_verified(
    fake: Archive, signer: Gpg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = signer.keyring
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no gpgv on it
    messages: list[str] = []
    origin = fetcher(fake, tmp_path / "cache", messages, keyring)

    origin.download([fake.hello], tmp_path / "debs")

    assert [m for m in messages if NOT_VERIFIED in m] == origin.warnings
    assert origin.warnings[0].startswith(f"WARNING: bookworm {NOT_VERIFIED} (no gpgv on PATH)")
    assert (tmp_path / "debs" / fake.hello.deb_name).is_file()  # the lock's SHA256 held


def test_without_a_keyring_the_report_says_so_too(
    fake: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "DEFAULT_KEYRING", tmp_path / "none.gpg")
    messages: list[str] = []

    fetcher(fake, tmp_path / "cache", messages, keyring=None).download([fake.hello], tmp_path / "d")

    warnings = [m for m in messages if NOT_VERIFIED in m]
    assert len(warnings) == 1
    assert "(no keyring: set HARPOON_DEBIAN_KEYRING to Debian's)" in warnings[0]


def test_a_configured_keyring_that_is_not_there_is_an_error(fake: Archive, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=r"HARPOON_DEBIAN_KEYRING=.*no such keyring"):
        fetcher(fake, tmp_path / "cache", keyring=tmp_path / "gone.gpg").release("bookworm")


def test_an_expired_inrelease_is_refused(fake: Archive, signer: Gpg, tmp_path: Path) -> None:
    fake.bookworm.valid_until = "Sat, 05 Dec 2020 03:33:28 UTC"
    fake.publish(signer)

    with pytest.raises(ArchiveError, match="InRelease expired on 2020-12-05"):
        fetcher(fake, tmp_path / "cache").release("bookworm")


def test_the_python_resolver_takes_the_highest_version_of_any_suite(
    fake: Archive, tmp_path: Path
) -> None:
    chosen = fetcher(fake, tmp_path / "cache").candidates(
        ["hello", "libfoo1"], ["bookworm", "bookworm-security"]
    )

    assert chosen == [fake.hello, fake.patched]
    with pytest.raises(ArchiveError, match="no amd64 package nothere in bookworm"):
        fetcher(fake, tmp_path / "cache").candidates(["nothere"], ["bookworm"])


def test_refresh_without_apt_resolves_with_python_and_writes_the_lock(
    fake: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in fake.environ(fake.keyring).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(build, "BASE_PACKAGES", ("hello",))
    monkeypatch.setattr(build, "UPB_PACKAGES", ("libfoo1",))
    monkeypatch.setattr(build, "OCI_RUNTIME_PACKAGES", ())
    monkeypatch.setattr(build, "NETFILTER_PACKAGES", ())
    lock_file = tmp_path / "locks/amd64.json"

    packages = build.resolve_packages(
        "amd64", tmp_path / "cache", True, lambda _: None, lock_file=lock_file, method="python"
    )

    assert [(p.name, p.version, p.suite) for p in packages] == [
        ("linux-image-6.1.0-9-amd64", "6.1.1-1", "bookworm"),
        ("hello", "1.0-1", "bookworm"),
        ("libfoo1", "2.0-1+deb12u1", "bookworm-security"),
    ]
    written = locks.read(lock_file)
    assert written is not None and list(written.packages) == packages
    assert written.requested == ("linux-image-amd64", "hello", "libfoo1")
    # The build then fetches exactly those files, through the same checks.
    debs = build.fetch_debs("amd64", packages, tmp_path / "cache", "python", lambda _: None)
    assert [hashlib.sha256(d.read_bytes()).hexdigest() for d in debs] == [
        p.sha256 for p in packages
    ]


def test_the_build_fetches_with_apt_only_where_there_is_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(build.FETCH_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert build.fetch_method() == "python"
    with pytest.raises(debian.DebianError, match="apt-get or apt-cache is not on PATH"):
        build.fetch_method("apt")
    for tool in ("apt-get", "apt-cache"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    assert build.fetch_method() == "apt"
    monkeypatch.setenv(build.FETCH_ENV, "python")
    assert build.fetch_method() == "python"
    monkeypatch.setenv(build.FETCH_ENV, "curl")
    with pytest.raises(debian.DebianError, match="must be one of apt, python, not 'curl'"):
        build.fetch_method()


def test_a_zstd_deb_without_a_zstd_reader_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = tmp_path / "z_1_amd64.deb"
    deb.write_bytes(make_deb("z", "1", "amd64", {"": b"(zstd bytes)"}, data_member="data.tar.zst"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)  # not installed

    with pytest.raises(debian.DebianError, match=r"z_1_amd64\.deb: .*zstd.*zstandard.*dpkg-deb"):
        debian.extract(deb, tmp_path / "root")


@pytest.mark.skipif(
    shutil.which("zstd") is None or shutil.which("dpkg-deb") is None,
    reason="needs zstd to make a .zst member and dpkg-deb to read it",
)
def test_a_zstd_deb_is_read_through_dpkg_deb_where_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tree/usr/bin").mkdir(parents=True)
    (tmp_path / "tree/usr/bin/z").write_bytes(b"zed")
    tar = subprocess.run(
        ["tar", "-C", str(tmp_path / "tree"), "--owner=0", "--group=0", "-c", "./usr"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    packed = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True)
    deb = tmp_path / "z_1_amd64.deb"
    deb.write_bytes(make_deb("z", "1", "amd64", {"": packed.stdout}, data_member="data.tar.zst"))
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)

    debian.extract(deb, tmp_path / "root")

    assert (tmp_path / "root/usr/bin/z").read_bytes() == b"zed"
    assert os.access(tmp_path / "root/usr/bin/z", os.R_OK)
