"""The Debian archive's formats and the chain of checks, without I/O (harpoon.guest.archive):
InRelease's clearsigned text, Release's SHA256 list, Packages stanzas, version order, and
the refusals that name the file that was wrong."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import shutil
import subprocess
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harpoon.guest import archive, build, lock
from harpoon.guest.archive import ArchiveError, IndexedFile
from harpoon.guest.debian import DebPackage
from tests.unit.fake_debian_archive import fake_signature

RELEASE = (
    "Origin: Debian\nSuite: oldstable-security\nCodename: bookworm-security\n"
    "Date: Sat, 05 Dec 2026 03:33:28 UTC\nValid-Until: Sat, 12 Dec 2026 03:33:28 UTC\n"
    "Acquire-By-Hash: yes\nSHA256:\n"
    " b85a70a2faeb81845da9ed4a22a2f413d3c69371625f1fbbda7615428a4c977b  2584840"
    " main/binary-amd64/Packages\n"
    " 37ce44ed35c564ad121583cb41ed7da6341e5caf210365502da07a294487c836   386328"
    " main/binary-amd64/Packages.xz\n"
    " 6777ea16514725f9427f48c240d92e0a6b8496138e37a1491d8597e66774e309 12084798"
    " main/binary-arm64/Packages.gz\n"
)

STANZAS = """Package: libc6
Version: 2.36-9+deb12u7
Architecture: amd64
Filename: pool/updates/main/g/glibc/libc6_2.36-9+deb12u7_amd64.deb
Size: 2757936
SHA256: 1111111111111111111111111111111111111111111111111111111111111111
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.

Package: libc6
Version: 2.36-9+deb12u14
Architecture: amd64
Depends: libgcc-s1
Filename: pool/main/g/glibc/libc6_2.36-9+deb12u14_amd64.deb
Size: 2759320
SHA256: 2222222222222222222222222222222222222222222222222222222222222222

Package: zlib1g
Version: 1:1.2.13.dfsg-1
Architecture: amd64
Filename: pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb
Size: 87000
SHA256: 3333333333333333333333333333333333333333333333333333333333333333
"""

LIBC6 = DebPackage(
    "libc6", "2.36-9+deb12u14", "amd64", "pool/main/g/glibc/libc6_2.36-9+deb12u14_amd64.deb",
    "2" * 64, size=2759320, suite="bookworm",
)  # fmt: skip


def test_the_signed_text_of_inrelease_is_read_and_dash_unescaped() -> None:
    text = "Origin: Debian\n-dashed: line\nSHA256:\n"

    assert archive.clearsigned_text(fake_signature(text), "InRelease") == text


@pytest.mark.parametrize(
    ("damage", "complaint"),
    [
        (lambda m: b"Origin: evil\n" + m, "not a clearsigned message"),
        (lambda m: m + b"Origin: evil\n", "followed by text"),
        (lambda m: m.replace(b"-----END PGP SIGNATURE-----\n", b""), "unterminated"),
        (lambda m: m.split(b"-----BEGIN PGP SIGNATURE-----")[0], "no signature block"),
        (lambda m: m.replace(b"Hash: SHA256", b"Comment: hi"), "armor header"),
        (lambda m: m.replace(b"Origin", b"-Origin"), "unescaped '-'"),
        (lambda m: b"\xff" + m, "not UTF-8"),
    ],
)
def test_inrelease_with_anything_outside_one_signed_block_is_refused(
    damage: object, complaint: str
) -> None:
    message = fake_signature("Origin: Debian\n")
    assert callable(damage)

    with pytest.raises(ArchiveError, match=complaint) as error:
        archive.clearsigned_text(damage(message), "dists/bookworm/InRelease")

    assert "dists/bookworm/InRelease" in str(error.value)


def test_a_release_lists_its_indices_and_prefers_xz() -> None:
    release = archive.parse_release(RELEASE, "Release")

    assert release.fields["Codename"] == "bookworm-security"
    assert release.by_hash
    assert release.packages_index("main", "amd64") == IndexedFile(
        "main/binary-amd64/Packages.xz",
        "37ce44ed35c564ad121583cb41ed7da6341e5caf210365502da07a294487c836",
        386328,
    )
    assert release.packages_index("main", "arm64").path == "main/binary-arm64/Packages.gz"
    with pytest.raises(ArchiveError, match="no main/binary-riscv64/Packages"):
        release.packages_index("main", "riscv64")


@pytest.mark.parametrize(
    "line", [" nothex 12 main/x", " " + "a" * 64 + " twelve main/x", " " + "a" * 63 + " 1 x"]
)
def test_a_malformed_sha256_line_is_refused(line: str) -> None:
    with pytest.raises(ArchiveError, match="malformed SHA256 line"):
        archive.parse_release(f"Origin: x\nSHA256:\n{line}\n", "InRelease")


def test_a_release_without_sha256_is_refused() -> None:
    with pytest.raises(ArchiveError, match="no SHA256 field"):
        archive.parse_release("Origin: x\nMD5Sum:\n abc 1 x\n", "InRelease")


def test_a_release_past_its_valid_until_is_refused() -> None:
    release = archive.parse_release(RELEASE, "Release")

    release.check_fresh(datetime(2026, 12, 12, tzinfo=UTC), "InRelease")
    with pytest.raises(ArchiveError, match="InRelease expired on 2026-12-12"):
        release.check_fresh(datetime(2026, 12, 13, tzinfo=UTC), "InRelease")


def test_a_file_is_refused_unless_its_size_and_sha256_are_those_listed() -> None:
    data = b"Package: x\n"
    listed = IndexedFile("main/binary-amd64/Packages", hashlib.sha256(data).hexdigest(), 11)

    archive.check_file(data, listed, "dists/x/main/binary-amd64/Packages", "InRelease")
    with pytest.raises(ArchiveError, match=r"dists/x/.*Packages: 12 bytes, but InRelease says 11"):
        archive.check_file(data + b"!", listed, "dists/x/main/binary-amd64/Packages", "InRelease")
    with pytest.raises(ArchiveError, match=r"Packages: SHA256 .* differs .* in InRelease: refused"):
        archive.check_file(
            b"Package: y\n", listed, "dists/x/main/binary-amd64/Packages", "InRelease"
        )


def test_indices_are_read_in_each_compression() -> None:
    text = "Package: x\n"

    for suffix, packed in (
        (".xz", lzma.compress(text.encode())),
        (".gz", gzip.compress(text.encode())),
        ("", text.encode()),
    ):
        assert archive.decompress_index(packed, f"Packages{suffix}") == text
    with pytest.raises(ArchiveError, match=r"Packages\.xz: cannot decompress"):
        archive.decompress_index(b"not xz", "Packages.xz")


def test_only_the_stanzas_asked_for_are_found_every_version_of_each() -> None:
    found = archive.find_stanzas(STANZAS, ["libc6", "busybox"])

    assert [s["Version"] for s in found["libc6"]] == ["2.36-9+deb12u7", "2.36-9+deb12u14"]
    assert found["busybox"] == []
    assert found["libc6"][0]["Description"].endswith("\nthe system.")
    assert "zlib1g" not in found


def test_the_index_vouches_for_the_locked_sha256_or_the_package_is_refused() -> None:
    stanzas = archive.find_stanzas(STANZAS, ["libc6"])["libc6"]

    entry = archive.locked_entry(stanzas, LIBC6, "the bookworm index")
    assert entry == IndexedFile(LIBC6.filename, LIBC6.sha256, 2759320)

    tampered = DebPackage(**{**LIBC6.__dict__, "sha256": "f" * 64})
    with pytest.raises(ArchiveError, match=r"the bookworm index lists SHA256 2222.*the lock f+"):
        archive.locked_entry(stanzas, tampered, "the bookworm index")
    gone = DebPackage(**{**LIBC6.__dict__, "version": "2.36-9+deb12u99"})
    with pytest.raises(ArchiveError, match=r"not in the bookworm index .* --refresh"):
        archive.locked_entry(stanzas, gone, "the bookworm index")
    resized = DebPackage(**{**LIBC6.__dict__, "size": 5})
    with pytest.raises(ArchiveError, match="says 2759320 bytes, the lock 5"):
        archive.locked_entry(stanzas, resized, "the bookworm index")


def test_the_candidate_is_the_highest_version_of_any_suite_for_the_arch() -> None:
    stanzas = archive.find_stanzas(STANZAS, ["libc6"])["libc6"]
    older, newer = stanzas
    arm = {**newer, "Architecture": "arm64", "Version": "9.0-1"}

    chosen = archive.candidate(
        [("bookworm-security", [older, arm]), ("bookworm", [newer])], "amd64", "libc6"
    )

    assert chosen is not None
    assert (chosen.version, chosen.suite, chosen.size) == ("2.36-9+deb12u14", "bookworm", 2759320)
    assert chosen.depends == "libgcc-s1"
    assert archive.candidate([("bookworm", [arm])], "amd64", "libc6") is None


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ("1.0~rc1", "1.0"),
        ("1.0", "1.0+b1"),
        ("1.0", "1.0-1"),
        ("1.0-1", "1.0-1.1"),
        ("1.2.13.dfsg-1", "1:1.0"),
        ("2.36-9+deb12u7", "2.36-9+deb12u14"),
        ("1.0~~", "1.0~"),
        ("1.0a", "1.0+"),
        ("6.1.192-3", "6.1.192-3+b1"),
        ("252.39-1~deb12u1", "252.39-1"),
        ("1.9", "1.10"),
    ],
)
def test_debian_versions_sort_as_policy_says(smaller: str, larger: str) -> None:
    assert archive.compare_versions(smaller, larger) == -1
    assert archive.compare_versions(larger, smaller) == 1
    assert archive.compare_versions(larger, larger) == 0


def test_a_malformed_version_is_refused() -> None:
    for bad in ("", "a1.0", "1.0-", "x:1.0"):
        with pytest.raises(ArchiveError, match="not a Debian version"):
            archive.compare_versions(bad, "1.0")


_PART = st.text("0123456789abz.+~", min_size=1, max_size=6)
VERSIONS = st.builds(
    lambda epoch, upstream, revision: (f"{epoch}:" if epoch else "") + "1" + upstream
    + (f"-{revision}" if revision else ""),
    st.sampled_from([0, 0, 1, 2]),
    _PART,
    st.one_of(st.none(), _PART),
)  # fmt: skip


@given(VERSIONS, VERSIONS, VERSIONS)
def test_version_order_is_a_total_order(a: str, b: str, c: str) -> None:
    assert archive.compare_versions(a, a) == 0
    assert archive.compare_versions(a, b) == -archive.compare_versions(b, a)
    ordered = sorted([a, b, c], key=archive.version_key)
    assert archive.compare_versions(ordered[0], ordered[2]) <= 0


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg to compare with")
@settings(max_examples=150, deadline=None)
@given(VERSIONS, VERSIONS)
def test_version_order_is_dpkgs(a: str, b: str) -> None:
    """dpkg --compare-versions is the reference (where there is dpkg)."""
    dpkg_says_less = subprocess.run(["dpkg", "--compare-versions", a, "lt", b]).returncode == 0
    dpkg_says_equal = subprocess.run(["dpkg", "--compare-versions", a, "eq", b]).returncode == 0

    expected = -1 if dpkg_says_less else 0 if dpkg_says_equal else 1
    assert archive.compare_versions(a, b) == expected


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_repos_lock_pins_every_requested_package_with_its_suite(arch: str) -> None:
    """The lock shipped in the repo matches the builder's lists: a package added to them
    without `harpoon guest build --refresh` (or a build that rewrites the lock) fails here."""
    locked = lock.read(lock.lock_path(arch, lock.LOCK_DIR))

    assert locked is not None
    assert list(locked.requested) == build.requested_packages(arch)
    assert locked.suites == build.DEBIAN_SUITES
    assert locked.packages[0].name.startswith("linux-image-6.")
    names = [p.name for p in locked.packages[1:]]
    assert names == build.requested_packages(arch)[1:]
    for package in locked.packages:
        assert package.arch in (arch, "all")
        assert package.size > 0 and package.suite in locked.suites
        assert package.filename.startswith("pool/") and package.filename.endswith(".deb")
