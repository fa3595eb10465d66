"""harpoon.private: what harpoon makes on the host is its user's alone, whatever the umask."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon import private


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """The loosest umask a shim could be started with: nothing is cut by it."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_directory_and_its_missing_parents_are_0700_but_existing_ones_are_left(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o755)
    leaf = tmp_path / "var" / "lib" / "harpoon"
    private.directory(leaf)
    assert [mode(p) for p in (leaf, leaf.parent, leaf.parent.parent)] == [0o700] * 3
    assert mode(tmp_path) == 0o755


def test_a_directory_an_older_harpoon_made_looser_is_tightened(tmp_path: Path) -> None:
    old = tmp_path / "run"
    old.mkdir(mode=0o755)
    private.directory(old)
    assert mode(old) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)  # only group and other access is taken: not the sticky bit
    private.directory(shared)
    assert mode(shared) == 0o1700


def test_a_file_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        private.directory(tmp_path / "f")


def test_files_are_written_0600_and_old_ones_tightened_when_written_or_read(
    tmp_path: Path,
) -> None:
    new = tmp_path / "new"
    private.write_file(new, b"hello")
    assert (new.read_bytes(), mode(new)) == (b"hello", 0o600)
    old = tmp_path / "old"
    old.write_bytes(b"a longer text")
    old.chmod(0o644)
    private.write_file(old, b"short")
    assert (old.read_bytes(), mode(old)) == (b"short", 0o600)
    cache = tmp_path / "cache"
    cache.write_bytes(b"kvm")
    cache.chmod(0o644)
    assert private.read_file(cache) == b"kvm"
    assert mode(cache) == 0o600


def test_a_link_is_never_followed_to_a_file_to_write(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        private.write_file(tmp_path / "link", b"written")
    assert target.read_bytes() == b"untouched"


def test_a_bound_socket_is_0600_before_it_listens(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        private.bind(listener, tmp_path / "s.sock")
        assert mode(tmp_path / "s.sock") == 0o600
