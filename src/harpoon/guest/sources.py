"""Where the Debian archive is: the mirror of each suite, from configuration only.

For a suite, in order: the environment (`HARPOON_DEBIAN_SECURITY_MIRROR` for a
`*-security` suite, `HARPOON_DEBIAN_MIRROR` for the others), then the host's apt
sources (one-line `deb URI SUITE ...` lists or deb822 `.sources` files) where a `deb`
entry lists that suite. No mirror's address is written in harpoon's code: a machine
with neither (a Mac) is told which variable to set.

The keyring that InRelease signatures are checked against: `HARPOON_DEBIAN_KEYRING`,
else Debian's own where the debian-archive-keyring package put it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harpoon.guest.debian import DebianError

MIRROR_ENV = "HARPOON_DEBIAN_MIRROR"
SECURITY_MIRROR_ENV = "HARPOON_DEBIAN_SECURITY_MIRROR"
KEYRING_ENV = "HARPOON_DEBIAN_KEYRING"
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


class MirrorNotConfiguredError(DebianError):
    """No mirror is configured for a suite the build needs."""


@dataclass(frozen=True)
class SourceEntry:
    """One binary (`deb`) entry of apt's sources: a base URI and the suites it serves."""

    uri: str
    suites: tuple[str, ...]


def parse_sources(text: str, *, deb822: bool) -> list[SourceEntry]:
    """The `deb` entries of one apt sources file (`deb-src` and comments skipped)."""
    entries = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split():
                suites = tuple(fields.get("suites", "").split())
                entries += [SourceEntry(uri, suites) for uri in fields.get("uris", "").split()]
        return entries
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            entries.append(SourceEntry(words[1], (words[2],)))
    return entries


def host_sources(sources: Sequence[Path] = APT_SOURCES) -> list[SourceEntry]:
    """Every `deb` entry of the host's apt sources, in apt's file order (none without apt)."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources"))
        elif source.is_file():
            files.append(source)
    entries: list[SourceEntry] = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        entries += parse_sources(text, deb822=path.suffix == ".sources")
    return entries


def mirror_env(suite: str) -> str:
    """The variable that names the mirror of `suite`."""
    return SECURITY_MIRROR_ENV if suite.endswith("-security") else MIRROR_ENV


def mirror_for(
    suite: str,
    environ: Mapping[str, str] | None = None,
    sources: Sequence[SourceEntry] | None = None,
) -> str:
    """The base URL (holding dists/ and pool/) of the mirror serving `suite`."""
    environ = os.environ if environ is None else environ
    variable = mirror_env(suite)
    if environ.get(variable):
        return environ[variable].rstrip("/")
    for entry in host_sources() if sources is None else sources:
        if suite in entry.suites:
            return entry.uri.rstrip("/")
    raise MirrorNotConfiguredError(
        f"no Debian mirror for suite {suite}: set {variable} to the base URL of a Debian "
        f"archive{' (security updates)' if variable == SECURITY_MIRROR_ENV else ''}, the "
        "directory holding dists/ and pool/ (the host's apt sources list none for it)"
    )


def keyring(environ: Mapping[str, str] | None = None) -> Path | None:
    """The keyring for InRelease signatures, if there is one on this machine."""
    environ = os.environ if environ is None else environ
    configured = environ.get(KEYRING_ENV)
    if configured:
        return Path(configured)
    return DEFAULT_KEYRING if DEFAULT_KEYRING.is_file() else None
