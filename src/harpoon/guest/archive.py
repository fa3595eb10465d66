"""A Debian archive's index files, parsed and checked without I/O (the chain of trust).

A Debian mirror serves, per suite, `dists/<suite>/InRelease`: the Release file, clearsigned
by the archive's key, listing the SHA256 and size of every index under it; among them
`main/binary-<arch>/Packages.xz`, a deb822 list of stanzas naming each package's pool
file and that file's SHA256. A .deb is trusted when the signed InRelease vouches for the
Packages file, and the Packages file for the .deb (and, for the guest, the repo's lock
names the same SHA256). This module parses those formats and checks each link; the
fetching is `harpoon.guest.mirror`'s, the signature check (gpgv) too.

Formats: Debian Policy 5.1 (deb822 control files), 5.6.12 (version numbers); the
repository format (wiki.debian.org/DebianRepository/Format: Release fields, by-hash);
RFC 4880 section 7 (cleartext signatures, dash-escaping).
"""

from __future__ import annotations

import hashlib
import lzma
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from functools import cmp_to_key

from harpoon.guest.debian import DebianError, DebPackage

_BEGIN_SIGNED = "-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIGNATURE = "-----BEGIN PGP SIGNATURE-----"
_END_SIGNATURE = "-----END PGP SIGNATURE-----"
# Index compressions this module reads, in the order they are preferred (smallest first).
INDEX_COMPRESSIONS = (".xz", ".gz", "")


class ArchiveError(DebianError):
    """An index file is malformed, or a file differs from what the index above it says."""


@dataclass(frozen=True)
class IndexedFile:
    """A file as an index lists it: its path (relative to the index's base), SHA256, size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    """A suite's Release file: its fields and the SHA256 list of the indices under it."""

    fields: Mapping[str, str]
    files: Mapping[str, IndexedFile]

    @property
    def by_hash(self) -> bool:
        """Whether indices may be fetched by their SHA256 (immune to a mirror's update
        racing the fetch: the name never changes meaning)."""
        return self.fields.get("Acquire-By-Hash", "no").lower() == "yes"

    def valid_until(self) -> datetime | None:
        value = self.fields.get("Valid-Until")
        return _parse_date(value, "Valid-Until") if value else None

    def check_fresh(self, now: datetime, what: str) -> None:
        """Refuse a Release past its Valid-Until (a mirror replaying an old, signed index
        would otherwise hide newer packages), as apt does."""
        until = self.valid_until()
        if until is not None and now > until:
            raise ArchiveError(f"{what} expired on {until.isoformat()} (Valid-Until)")

    def packages_index(self, component: str, arch: str) -> IndexedFile:
        """The Packages index of `component` for `arch`, in the first compression listed."""
        for suffix in INDEX_COMPRESSIONS:
            listed = self.files.get(f"{component}/binary-{arch}/Packages{suffix}")
            if listed is not None:
                return listed
        raise ArchiveError(
            f"the Release file of {self.fields.get('Codename', '?')} lists no "
            f"{component}/binary-{arch}/Packages index"
        )


def clearsigned_text(data: bytes, what: str) -> str:
    """The signed text of a clearsigned message (InRelease), dash-unescaped.

    Strict, like apt: one signed block, from the first line to the end of the file, and
    nothing outside it: text outside the signature is not what the signature vouches for,
    so a message carrying any is refused rather than parsed."""
    try:
        lines = [line.rstrip("\r") for line in data.decode("utf-8").split("\n")]
    except UnicodeDecodeError as error:
        raise ArchiveError(f"{what}: not UTF-8 text") from error
    if lines[0] != _BEGIN_SIGNED:
        raise ArchiveError(f"{what}: not a clearsigned message (no {_BEGIN_SIGNED!r})")
    index = 1
    while index < len(lines) and lines[index].strip():
        if not lines[index].startswith("Hash:"):
            raise ArchiveError(f"{what}: unexpected armor header {lines[index]!r}")
        index += 1
    if _BEGIN_SIGNATURE not in lines[index:]:
        raise ArchiveError(f"{what}: no signature block")
    end = lines.index(_BEGIN_SIGNATURE, index)
    # index is the blank line ending the armor headers; the text runs to the signature.
    body = [_dash_unescaped(lines[number], number + 1, what) for number in range(index + 1, end)]
    rest = lines[end + 1 :]
    trailer = rest[rest.index(_END_SIGNATURE) + 1 :] if _END_SIGNATURE in rest else ["missing"]
    if any(line.strip() for line in trailer):
        raise ArchiveError(f"{what}: the signature block is unterminated or followed by text")
    return "\n".join(body) + "\n"


def _dash_unescaped(line: str, number: int, what: str) -> str:
    """A line of signed text as signed (RFC 4880 7.1: '- ' prefixes a line starting '-')."""
    if line.startswith("- "):
        return line[2:]
    if line.startswith("-"):
        raise ArchiveError(f"{what}: line {number} starts with an unescaped '-'")
    return line


def parse_stanza(text: str) -> dict[str, str]:
    """One deb822 paragraph: field -> value (continuation lines joined with newlines)."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0] in " \t":
            if not key:
                raise ArchiveError(f"continuation line before any field: {line!r}")
            fields[key] += "\n" + line.strip()
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip():
            raise ArchiveError(f"not a 'Field: value' line: {line!r}")
        key = key.strip()
        fields[key] = value.strip()
    return fields


def parse_release(text: str, what: str) -> Release:
    """A Release file's fields and its SHA256 list (path -> IndexedFile)."""
    fields = parse_stanza(text)
    listing = fields.get("SHA256")
    if listing is None:
        raise ArchiveError(f"{what}: no SHA256 field")
    files: dict[str, IndexedFile] = {}
    for line in listing.splitlines():
        if not line.strip():
            continue
        words = line.split()
        if len(words) != 3 or not _is_sha256(words[0]) or not words[1].isdigit():
            raise ArchiveError(f"{what}: malformed SHA256 line {line!r}")
        files[words[2]] = IndexedFile(words[2], words[0], int(words[1]))
    return Release(fields, files)


def check_file(data: bytes, expected: IndexedFile, what: str, vouched_by: str) -> None:
    """Refuse `data` unless its size and SHA256 are those `vouched_by` lists for it."""
    if len(data) != expected.size:
        raise ArchiveError(
            f"{what}: {len(data)} bytes, but {vouched_by} says {expected.size}: refused"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.sha256:
        raise ArchiveError(
            f"{what}: SHA256 {actual} differs from {expected.sha256} in {vouched_by}: refused"
        )


def decompress_index(data: bytes, path: str) -> str:
    """An index's text from its bytes as served (`path` says the compression)."""
    try:
        if path.endswith(".xz"):
            raw = lzma.decompress(data)
        elif path.endswith(".gz"):
            raw = zlib.decompress(data, wbits=zlib.MAX_WBITS | 16)
        else:
            raw = data
        return raw.decode("utf-8")
    except (lzma.LZMAError, zlib.error, UnicodeDecodeError) as error:
        raise ArchiveError(f"{path}: cannot decompress or decode: {error}") from error


def find_stanzas(packages_text: str, names: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    """The stanzas of a Packages index for each of `names` (every version listed).

    Only the stanzas asked for are parsed: a main Packages file is ~50 MB of text."""
    wanted = set(names)
    found: dict[str, list[dict[str, str]]] = {name: [] for name in wanted}
    for paragraph in packages_text.split("\n\n"):
        head = paragraph.lstrip("\n")
        if not head.startswith("Package:"):
            continue
        name = head[len("Package:") : head.find("\n") if "\n" in head else None].strip()
        if name in wanted:
            found[name].append(parse_stanza(paragraph))
    return found


def package_of(stanza: Mapping[str, str], suite: str, what: str) -> DebPackage:
    """The package a Packages stanza describes, from `suite`."""
    try:
        return DebPackage(
            name=stanza["Package"],
            version=stanza["Version"],
            arch=stanza["Architecture"],
            filename=stanza["Filename"],
            sha256=stanza["SHA256"],
            depends=stanza.get("Depends", ""),
            size=int(stanza["Size"]),
            suite=suite,
        )
    except (KeyError, ValueError) as error:
        raise ArchiveError(
            f"{what}: a stanza of {stanza.get('Package', '?')} lacks {error}"
        ) from error


def locked_entry(
    stanzas: Iterable[Mapping[str, str]], locked: DebPackage, what: str
) -> IndexedFile:
    """The pool file of `locked` as the index (`what`) lists it, after checking that the
    index's SHA256 for that exact version is the lock's: the link index -> lock."""
    listed = [s for s in stanzas if s.get("Version") == locked.version]
    if not listed:
        raise ArchiveError(
            f"{locked.name} {locked.version} is not in {what} (the archive moved on since the "
            "lock was written: `harpoon guest build --refresh` re-resolves it)"
        )
    for stanza in listed:
        if stanza.get("SHA256") == locked.sha256 and stanza.get("Filename") == locked.filename:
            size = int(stanza.get("Size", "-1"))
            if locked.size and size != locked.size:
                raise ArchiveError(
                    f"{locked.name} {locked.version}: {what} says {size} bytes, the lock "
                    f"{locked.size}: refused"
                )
            return IndexedFile(locked.filename, locked.sha256, size)
    raise ArchiveError(
        f"{locked.name} {locked.version}: {what} lists SHA256 "
        f"{', '.join(s.get('SHA256', '?') for s in listed)}, the lock "
        f"{locked.sha256}: refused"
    )


def candidate(
    stanzas_by_suite: Iterable[tuple[str, Iterable[Mapping[str, str]]]],
    arch: str,
    what: str,
) -> DebPackage | None:
    """The version apt would install of one package (all suites at the default priority):
    the highest, for `arch` or `all`; among equals, the first suite's."""
    best: DebPackage | None = None
    for suite, stanzas in stanzas_by_suite:
        for stanza in stanzas:
            if stanza.get("Architecture") not in (arch, "all"):
                continue
            package = package_of(stanza, suite, what)
            if best is None or compare_versions(package.version, best.version) > 0:
                best = package
    return best


# Debian version numbers: [epoch:]upstream[-revision], Debian Policy 5.6.12.
_VERSION = re.compile(r"^(?:(\d+):)?([0-9][A-Za-z0-9.+~:-]*?)(?:-([A-Za-z0-9.+~]+))?$")


def split_version(version: str) -> tuple[int, str, str]:
    """(epoch, upstream, revision) of a Debian version; a bad one is an ArchiveError."""
    match = _VERSION.match(version)
    if match is None or (match.group(3) is None and "-" in match.group(2)):
        raise ArchiveError(f"not a Debian version number: {version!r}")
    return int(match.group(1) or 0), match.group(2), match.group(3) or "0"


def _order(char: str) -> int:
    """Policy's sort weight of one non-digit character: '~' before everything, even the
    end of the string; letters before non-letters."""
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(left: str, right: str) -> int:
    """Policy's comparison of an upstream version or a revision: alternately a run of
    non-digits (by `_order`, the end of the string weighing 0) and a number."""
    i = j = 0
    while i < len(left) or j < len(right):
        while (i < len(left) and not left[i].isdigit()) or (
            j < len(right) and not right[j].isdigit()
        ):
            a = _order(left[i]) if i < len(left) and not left[i].isdigit() else 0
            b = _order(right[j]) if j < len(right) and not right[j].isdigit() else 0
            if a != b:
                return -1 if a < b else 1
            i += 1
            j += 1
        start_i, start_j = i, j
        while i < len(left) and left[i].isdigit():
            i += 1
        while j < len(right) and right[j].isdigit():
            j += 1
        a_number = int(left[start_i:i] or 0)
        b_number = int(right[start_j:j] or 0)
        if a_number != b_number:
            return -1 if a_number < b_number else 1
    return 0


def compare_versions(left: str, right: str) -> int:
    """-1, 0 or 1 as Debian version `left` sorts before, equal to or after `right`."""
    a, b = split_version(left), split_version(right)
    if a[0] != b[0]:
        return -1 if a[0] < b[0] else 1
    return _compare_part(a[1], b[1]) or _compare_part(a[2], b[2])


version_key = cmp_to_key(compare_versions)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _parse_date(value: str, field: str) -> datetime:
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError) as error:
        raise ArchiveError(f"{field}: not an RFC 2822 date: {value!r}") from error
