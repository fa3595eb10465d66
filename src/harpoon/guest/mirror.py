"""Debian packages fetched in Python, where there is no apt (a Mac): the I/O of the chain.

For each suite a build needs: `dists/<suite>/InRelease` from the configured mirror
(harpoon.guest.sources), its signature checked with `gpgv` against Debian's keyring
where both exist (where they do not, a warning says so: never silently), then
`main/binary-<arch>/Packages.xz`, checked against InRelease's SHA256, then each .deb,
checked against the Packages entry's SHA256, which must be the lock's. Indices are kept
in `$HARPOON_CACHE_DIR/debian-indexes/` by SHA256 (fetched again only when InRelease
names another), .debs in `$HARPOON_CACHE_DIR/debs/<arch>/`, the directory the apt path
uses, and a cached .deb is hashed again before every use. The formats and checks are
harpoon.guest.archive's; this module only moves bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from harpoon.guest import archive, sources
from harpoon.guest.archive import ArchiveError, IndexedFile, Release
from harpoon.guest.debian import DebPackage, deb_ok

COMPONENT = "main"
HTTP_TIMEOUT_S = 60
HTTP_ATTEMPTS = 3
GPGV_TIMEOUT_S = 60
INDEX_CACHE = "debian-indexes"
_CHUNK = 1 << 20


class Mirror:
    """The configured Debian archive as one architecture's builds read it."""

    def __init__(
        self,
        arch: str,
        cache_dir: Path,
        *,
        report: Callable[[str], None],
        environ: Mapping[str, str] | None = None,
        apt_sources: Sequence[sources.SourceEntry] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.arch = arch
        self.cache_dir = cache_dir
        self.report = report
        self._environ = os.environ if environ is None else environ
        self._apt_sources = apt_sources
        self._now = now
        self._releases: dict[str, Release] = {}
        self._indices: dict[str, str] = {}
        self.warnings: list[str] = []

    # The chain, link by link.

    def base(self, suite: str) -> str:
        return sources.mirror_for(suite, self._environ, self._apt_sources)

    def release(self, suite: str) -> Release:
        """The suite's Release, from its InRelease, signature checked (or said not to be)."""
        if suite not in self._releases:
            url = f"{self.base(suite)}/dists/{suite}/InRelease"
            data = _get(url)
            text = archive.clearsigned_text(data, url)
            self._check_signature(data, text, suite, url)
            release = archive.parse_release(text, url)
            release.check_fresh(self._now(), url)
            self._releases[suite] = release
        return self._releases[suite]

    def index(self, suite: str) -> str:
        """The text of the suite's Packages index for this architecture (checked against
        the Release's SHA256: the link InRelease -> Packages)."""
        if suite not in self._indices:
            release = self.release(suite)
            listed = release.packages_index(COMPONENT, self.arch)
            data = self._cached_index(listed) or self._fetch_index(suite, release, listed)
            self._indices[suite] = archive.decompress_index(data, listed.path)
        return self._indices[suite]

    def _cached_index(self, listed: IndexedFile) -> bytes | None:
        path = self._index_cache_path(listed)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        # Hashed again: the cache is shared and a file there may be damaged.
        return data if hashlib.sha256(data).hexdigest() == listed.sha256 else None

    def _fetch_index(self, suite: str, release: Release, listed: IndexedFile) -> bytes:
        base = f"{self.base(suite)}/dists/{suite}"
        urls = [f"{base}/{listed.path}"]
        if release.by_hash:
            # by-hash first: a mirror that updates between our two requests still serves
            # the exact file this InRelease names.
            directory = PurePosixPath(listed.path).parent
            urls.insert(0, f"{base}/{directory}/by-hash/SHA256/{listed.sha256}")
        self.report(f"fetching {suite} {listed.path} ({listed.size / 1e6:.1f} MB)")
        data = _get_first(urls)
        archive.check_file(data, listed, urls[-1], f"{suite}'s InRelease")
        _write_atomically(self._index_cache_path(listed), data)
        return data

    def _index_cache_path(self, listed: IndexedFile) -> Path:
        suffix = "".join(PurePosixPath(listed.path).suffixes[-1:])
        return self.cache_dir / INDEX_CACHE / f"{listed.sha256}{suffix}"

    def _check_signature(self, data: bytes, text: str, suite: str, url: str) -> None:
        gpgv = shutil.which("gpgv")
        keyring = sources.keyring(self._environ)
        if keyring is not None and not keyring.is_file():
            raise ArchiveError(f"{sources.KEYRING_ENV}={keyring}: no such keyring file")
        if gpgv is None or keyring is None:
            reasons = [
                reason
                for reason, applies in (
                    ("no gpgv on PATH", gpgv is None),
                    (f"no keyring: set {sources.KEYRING_ENV} to Debian's", keyring is None),
                )
                if applies
            ]
            warning = (
                f"WARNING: {suite} InRelease signature NOT verified: gpgv/keyring missing "
                f"({'; '.join(reasons)}); the packages are still checked against the lock's "
                "SHA256"
            )
            self.warnings.append(warning)
            self.report(warning)
            return
        signed = verify_signature(data, gpgv, keyring, url)
        if signed.rstrip("\n") != text.rstrip("\n"):
            raise ArchiveError(f"{url}: the text parsed is not the text gpgv verified: refused")
        self.report(f"{suite} InRelease: signature verified by gpgv ({keyring})")

    # What the build asks for.

    def locate(self, package: DebPackage) -> IndexedFile:
        """The pool file of a locked package, after the index of its suite has vouched
        for the lock's SHA256 (the link Packages -> lock)."""
        if not package.suite:
            raise ArchiveError(f"{package.name}: the lock records no suite to fetch it from")
        stanzas = archive.find_stanzas(self.index(package.suite), [package.name])
        what = f"the {package.suite} {self.arch} Packages index"
        return archive.locked_entry(stanzas[package.name], package, what)

    def download(self, packages: Iterable[DebPackage], into: Path) -> list[Path]:
        """The .deb of each package in `into`, fetching those missing or damaged; every
        one checked against the lock's SHA256 (and a fetched one the index's too)."""
        into.mkdir(parents=True, exist_ok=True)
        paths = []
        for package in packages:
            path = into / package.deb_name
            if not deb_ok(path, package.sha256):
                listed = self.locate(package)
                url = f"{self.base(package.suite)}/{package.filename}"
                self.report(f"downloading {package.deb_name} ({listed.size / 1e6:.2f} MB)")
                _download(url, listed, path, f"the {package.suite} Packages index")
            paths.append(path)
        return paths

    def candidates(self, names: Sequence[str], suites: Sequence[str]) -> list[DebPackage]:
        """The version apt would install of each name, from the suites' indices: the
        Python resolver of `harpoon guest build --refresh` where there is no apt."""
        found: dict[str, list[tuple[str, list[dict[str, str]]]]] = {n: [] for n in names}
        for suite in suites:
            for name, stanzas in archive.find_stanzas(self.index(suite), names).items():
                found[name].append((suite, stanzas))
        chosen = {}
        for name in names:
            best = archive.candidate(found[name], self.arch, f"{name} in {', '.join(suites)}")
            if best is None:
                raise ArchiveError(
                    f"no {self.arch} package {name} in {', '.join(suites)} ({COMPONENT})"
                )
            chosen[name] = best
        return [chosen[n] for n in names]


def verify_signature(data: bytes, gpgv: str, keyring: Path, what: str) -> str:
    """The text a clearsigned message's signature vouches for, as gpgv verified it with
    `keyring`; a bad or unknown signature is an error naming `what`."""
    with tempfile.TemporaryDirectory(prefix="harpoon-gpgv-") as scratch:
        signed, output = Path(scratch) / "InRelease", Path(scratch) / "signed"
        signed.write_bytes(data)
        # A private home: gpgv reads no user keyring and leaves nothing behind.
        done = subprocess.run(
            [gpgv, "--homedir", scratch, "--keyring", str(keyring), "--output", str(output),
             str(signed)],
            capture_output=True, text=True, timeout=GPGV_TIMEOUT_S, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            said = " ".join(done.stderr.split())
            raise ArchiveError(f"{what}: signature check failed (gpgv with {keyring}): {said}")
        return output.read_text()


def _get(url: str) -> bytes:
    last: Exception | None = None
    for _attempt in range(HTTP_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as error:
            raise ArchiveError(f"{url}: HTTP {error.code} {error.reason}") from error
        except (urllib.error.URLError, OSError) as error:
            last = error
    raise ArchiveError(f"{url}: {last}")


def _get_first(urls: Sequence[str]) -> bytes:
    """The first of `urls` the mirror serves (by-hash, then the plain path: apt's order)."""
    for url in urls[:-1]:
        try:
            return _get(url)
        except ArchiveError:
            continue
    return _get(urls[-1])


def _download(url: str, listed: IndexedFile, path: Path, vouched_by: str) -> None:
    """Stream `url` into `path` (through a temporary name), refused unless its size and
    SHA256 are `listed`'s."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        digest, size = hashlib.sha256(), 0
        with (
            urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response,
            temporary.open("wb") as out,
        ):
            while block := response.read(_CHUNK):
                size += len(block)
                if size > listed.size:
                    raise ArchiveError(
                        f"{url}: more than the {listed.size} bytes {vouched_by} says: refused"
                    )
                digest.update(block)
                out.write(block)
        if size != listed.size or digest.hexdigest() != listed.sha256:
            raise ArchiveError(
                f"{url}: {size} bytes with SHA256 {digest.hexdigest()}, but {vouched_by} "
                f"says {listed.size} bytes with {listed.sha256}: refused"
            )
        temporary.replace(path)
    except urllib.error.HTTPError as error:
        raise ArchiveError(f"{url}: HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise ArchiveError(f"{url}: {error.reason}") from error
    finally:
        temporary.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(data)
    temporary.replace(path)
