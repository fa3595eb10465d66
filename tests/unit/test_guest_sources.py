"""Where the Debian archive is (harpoon.guest.sources): configuration first, the host's apt
sources next, and a clear error naming the variable to set when neither says."""

from __future__ import annotations

from pathlib import Path

import pytest

from harpoon.guest import sources
from harpoon.guest.sources import SourceEntry

HOST = [
    SourceEntry("http://mirror.example/debian/", ("bookworm", "bookworm-updates")),
    SourceEntry("http://mirror.example/debian-security", ("bookworm-security",)),
]


def test_the_environment_names_the_mirror_and_the_security_mirror() -> None:
    environ = {
        sources.MIRROR_ENV: "http://a.example/debian/",
        sources.SECURITY_MIRROR_ENV: "http://b.example/debian-security",
    }

    assert sources.mirror_for("bookworm", environ, HOST) == "http://a.example/debian"
    assert sources.mirror_for("bookworm-updates", environ, HOST) == "http://a.example/debian"
    assert sources.mirror_for("bookworm-security", environ, HOST) == (
        "http://b.example/debian-security"
    )


def test_without_configuration_the_hosts_apt_sources_serve_each_suite() -> None:
    assert sources.mirror_for("bookworm", {}, HOST) == "http://mirror.example/debian"
    assert sources.mirror_for("bookworm-security", {}, HOST) == (
        "http://mirror.example/debian-security"
    )
    only_main = {sources.MIRROR_ENV: "http://a.example/debian"}
    assert sources.mirror_for("bookworm-security", only_main, HOST) == (
        "http://mirror.example/debian-security"
    )


def test_with_neither_the_error_names_the_variable_to_set() -> None:
    with pytest.raises(sources.MirrorNotConfiguredError, match="set HARPOON_DEBIAN_MIRROR"):
        sources.mirror_for("bookworm", {}, [])
    with pytest.raises(
        sources.MirrorNotConfiguredError, match="suite bookworm-security: set HARPOON_DEBIAN_SEC"
    ):
        sources.mirror_for("bookworm-security", {sources.MIRROR_ENV: "http://a.example/d"}, [])


def test_apt_sources_in_both_formats_are_read_deb_entries_only(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"
    )
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://two.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: trixie\n"
    )
    (parts / "ignored.txt").write_text("deb http://three.example/debian trixie main\n")

    entries = sources.host_sources((tmp_path / "sources.list", parts, tmp_path / "missing"))

    assert entries == [
        SourceEntry("http://one.example/debian", ("bookworm",)),
        SourceEntry("http://two.example/debian-security", ("bookworm-security",)),
    ]


def test_the_keyring_is_configured_or_debians_own(tmp_path: Path) -> None:
    assert sources.keyring({sources.KEYRING_ENV: str(tmp_path / "k.gpg")}) == tmp_path / "k.gpg"
    expected = sources.DEFAULT_KEYRING if sources.DEFAULT_KEYRING.is_file() else None
    assert sources.keyring({}) == expected
