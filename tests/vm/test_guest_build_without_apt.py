"""`harpoon guest build` on a machine without apt or dpkg (as a Mac is) builds the same
image, byte for byte, as the apt build: the repo's lock pins the packages, and the
Python fetch (harpoon.guest.mirror) follows InRelease -> Packages -> .deb to them.

The build runs as a user runs it, in a subprocess, with a PATH from which apt, apt-get,
apt-cache, dpkg and dpkg-deb are hidden, into a private guest directory and a private
cache. To keep the test short the cache is seeded with (hard links to) the .debs the
apt build has, all but `FETCHED`: one package of each suite, which the build must
download from the configured mirror, after fetching and checking both suites'
InRelease and Packages index. It needs the network to the Debian mirror the host's apt
sources (or $HARPOON_DEBIAN_MIRROR and $HARPOON_DEBIAN_SECURITY_MIRROR) name."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harpoon.guest import build, cache, lock, sources
from harpoon.guest.debian import DebianError
from tests.prerequisites import unavailable

HIDDEN = ("apt", "apt-get", "apt-cache", "dpkg", "dpkg-deb")
# Small packages of the two suites the lock draws from: each suite's index is fetched.
FETCHED = {"libffi8": "bookworm", "zlib1g": "bookworm-security"}
BUILD_TIMEOUT_S = 600


def path_without_apt(bin_dir: Path) -> str:
    """A PATH of one directory: links to every program on this PATH but `HIDDEN`."""
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in sorted(os.listdir(directory)):
            target = os.path.join(directory, entry)
            link = bin_dir / entry
            if entry in HIDDEN or link.exists() or link.is_symlink():
                continue
            if os.path.isfile(target) and os.access(target, os.X_OK):
                link.symlink_to(target)
    return str(bin_dir)


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def configured_mirror() -> None:
    try:
        for suite in FETCHED.values():
            sources.mirror_for(suite)
    except DebianError as error:
        unavailable(f"no Debian mirror to fetch from: {error}")


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_guest_built_without_apt_is_the_apt_built_image(arch: str, tmp_path: Path) -> None:
    if not build.has_apt():
        unavailable("the reference image is the apt build: this machine has no apt")
    configured_mirror()
    # The apt build (scripts/test's guest-image step built the host's: then instant).
    reference = build.build_guest(arch, fetch="apt")
    packages = lock.read(lock.lock_path(arch))
    assert packages is not None
    shared, private = cache.cache_root(), tmp_path / "cache"
    fetched = [p for p in packages.packages if p.name in FETCHED]
    assert {p.name: p.suite for p in fetched} == FETCHED
    for package in packages.packages:
        if package.name not in FETCHED:
            name = f"debs/{arch}/{package.deb_name}"
            link_or_copy(shared / name, private / name)
    for wheel in (shared / "wheels").glob(f"protobuf-*_{build.WHEEL_MACHINE[arch]}.whl"):
        link_or_copy(wheel, private / "wheels" / wheel.name)
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in (build.FETCH_ENV, lock.LOCK_DIR_ENV)
    }
    environ.update(
        PATH=path_without_apt(tmp_path / "bin"),
        PYTHONPATH=str(build.source_root()),
        HARPOON_GUEST_DIR=str(tmp_path / "guest"),
        HARPOON_CACHE_DIR=str(private),
        COLUMNS="300",  # the report's lines unwrapped
    )
    hidden = subprocess.run(
        ["sh", "-c", " || ".join(f"command -v {tool}" for tool in HIDDEN)],
        env=environ, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert hidden.returncode != 0, f"still on PATH: {hidden.stdout}"

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "harpoon.cli", "guest", "build", "--arch", arch],
        env=environ, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    print(f"\n{arch} guest built without apt in {took:.1f} s\n{done.stderr}")

    assert done.returncode == 0, done.stderr
    report = done.stderr
    assert f"fetching {len(packages.packages)} {arch} packages (Python, no apt)" in report
    for package in fetched:
        assert f"downloading {package.deb_name}" in report
        assert sha256(private / "debs" / arch / package.deb_name) == package.sha256
    keyring = sources.keyring()
    if shutil.which("gpgv") and keyring is not None:
        for suite in FETCHED.values():
            assert f"{suite} InRelease: signature verified by gpgv" in report
        assert "NOT verified" not in report
    else:
        assert "InRelease signature NOT verified: gpgv/keyring missing" in report
    assert list((private / "debian-indexes").iterdir())  # both indices fetched, by hash
    assert not (private / "apt").exists()  # apt never ran
    built = cache.find_guest(arch, tmp_path / "guest")
    manifest = cache.load_manifest(built.kernel.parent)
    assert manifest["digest"] == reference.digest
    expected = cache.load_manifest(reference.kernel.parent)
    for name in ("kernel", "initrd", "floor"):
        ours, theirs = (
            built.kernel.parent / manifest[name],
            reference.kernel.parent / expected[name],
        )
        assert sha256(ours) == sha256(theirs), f"{name} differs from the apt build's"
    assert f"digest {reference.digest}" in done.stdout
