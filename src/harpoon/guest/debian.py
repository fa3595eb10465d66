"""Debian packages for the guest: resolve exact versions, download and unpack .debs.

apt runs against a private state directory per architecture (its own package lists,
an empty dpkg status, `APT::Architecture` set to the guest's), so an arm64 guest is
built on an amd64 host without `dpkg --add-architecture` and without touching the
host's apt state. Sources come from the host's apt configuration. Where there is no apt
(a Mac), harpoon.guest.mirror fetches the same files in Python.

Unpacking is done in Python (ar, then tar with xz/gzip/bzip2; zstd with the `zstandard`
module when installed, else `dpkg-deb --fsys-tarfile`: Debian 12's packages are xz, and
a zstd one meets a clear error where neither is there). Nothing here installs a package
on the host.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

APT_TIMEOUT_S = 600
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER_BYTES = 60


class DebianError(RuntimeError):
    """apt could not resolve or fetch a package, or a .deb is malformed."""


@dataclass(frozen=True)
class DebPackage:
    """One exact package from the archive's index."""

    name: str
    version: str
    arch: str
    filename: str  # path in the archive, e.g. pool/main/b/busybox/busybox-static_..._amd64.deb
    sha256: str
    depends: str = ""
    size: int = 0  # bytes, as the archive's index says (0: not recorded)
    suite: str = ""  # the archive suite the index listing it belongs to, e.g. bookworm

    @property
    def deb_name(self) -> str:
        return Path(self.filename).name


class PrivateApt:
    """apt-get/apt-cache with their own lists and cache under `root`, for one architecture."""

    def __init__(self, root: Path, arch: str) -> None:
        self.root = root
        self.arch = arch

    def _options(self) -> list[str]:
        state = self.root / "state"
        return [
            "-o", f"Dir::State={state}",
            "-o", f"Dir::State::status={state / 'status'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", f"APT::Architecture={self.arch}",
            "-o", f"APT::Architectures={self.arch}",
            "-o", "Acquire::Languages=none",
            "-o", "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            "-o", "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            "-o", "Debug::NoLocking=1",
        ]  # fmt: skip

    def _run(self, tool: str, args: Sequence[str], cwd: Path | None = None) -> str:
        command = [tool, "-q", *self._options(), *args]
        try:
            done = subprocess.run(
                command,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=APT_TIMEOUT_S,
                check=False,
                env={**os.environ, "LC_ALL": "C"},
            )
        except FileNotFoundError as error:
            raise DebianError(f"{tool} not found: building the guest needs apt (Debian)") from error
        if done.returncode != 0:
            raise DebianError(
                f"{' '.join([tool, *args])} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    @property
    def has_lists(self) -> bool:
        lists = self.root / "state" / "lists"
        return lists.is_dir() and any(lists.glob("*_Packages*"))

    def update(self) -> None:
        """Fetch the package lists for this architecture (network)."""
        for directory in ("state/lists/partial", "cache/archives/partial"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        (self.root / "state" / "status").touch()
        self._run("apt-get", ["update"])

    def show(self, names: Iterable[str]) -> list[DebPackage]:
        """The candidate version of each named package (in the order asked)."""
        names = list(names)
        records = self._run("apt-cache", ["show", "--no-all-versions", *names])
        found: dict[str, DebPackage] = {}
        for record in records.strip().split("\n\n"):
            fields = _parse_record(record)
            package = DebPackage(
                name=fields["Package"],
                version=fields["Version"],
                arch=fields["Architecture"],
                filename=fields["Filename"],
                sha256=fields["SHA256"],
                depends=fields.get("Depends", ""),
                size=int(fields.get("Size", "0")),
            )
            found.setdefault(package.name, package)
        missing = [n for n in names if n not in found]
        if missing:
            raise DebianError(f"apt knows no {self.arch} package {', '.join(missing)}")
        return [found[n] for n in names]

    def with_suites(
        self, packages: Iterable[DebPackage], preferred: Sequence[str] = ()
    ) -> list[DebPackage]:
        """`packages` with the suite that lists each exact version (`apt-cache madison`:
        `name | version | URI suite/component arch Packages`): the lock records it so
        that a fetch without apt knows which index vouches for the file. Where several
        suites list it, the first of `preferred` (then madison's first)."""
        packages = list(packages)
        listing = self._run("apt-cache", ["madison", *sorted({p.name for p in packages})])
        suites: dict[tuple[str, str], list[str]] = {}
        for line in listing.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 3 and len(fields[2].split()) >= 2:
                suite = fields[2].split()[1].split("/", 1)[0]
                suites.setdefault((fields[0], fields[1]), []).append(suite)
        unlisted = [f"{p.name} {p.version}" for p in packages if (p.name, p.version) not in suites]
        if unlisted:
            raise DebianError(f"apt-cache madison lists no suite for {', '.join(unlisted)}")

        def rank(suite: str) -> int:
            return preferred.index(suite) if suite in preferred else len(preferred)

        return [replace(p, suite=min(suites[p.name, p.version], key=rank)) for p in packages]

    def closure(self, names: Iterable[str]) -> list[DebPackage]:
        """The packages that installing `names` (without recommends) into an empty
        system takes, dependencies first, as apt orders them: the candidates of
        `show`."""
        names = list(names)
        plan = self._run("apt-get", ["install", "--simulate", "--no-install-recommends", *names])
        chosen = [line.split()[1] for line in plan.splitlines() if line.startswith("Inst ")]
        if not chosen:
            raise DebianError(f"apt would install nothing for {', '.join(names)}")
        return self.show(chosen)

    def download(self, packages: Iterable[DebPackage], into: Path) -> list[Path]:
        """The .deb of each package in `into`, downloading those missing; checks SHA256."""
        into.mkdir(parents=True, exist_ok=True)
        packages = list(packages)
        missing = [p for p in packages if not deb_ok(into / p.deb_name, p.sha256)]
        if missing:
            self._run("apt-get", ["download", *(f"{p.name}={p.version}" for p in missing)], into)
        paths = []
        for package in packages:
            path = into / package.deb_name
            if not path.exists():
                # apt-get download escapes the epoch's ':' differently from the pool name.
                candidates = list(into.glob(f"{package.name}_*{package.arch}.deb"))
                matching = [c for c in candidates if _sha256(c) == package.sha256]
                if not matching:
                    raise DebianError(f"apt-get download did not leave {package.deb_name}")
                matching[0].rename(path)
            if not deb_ok(path, package.sha256):
                raise DebianError(f"{path}: SHA256 differs from the archive index")
            paths.append(path)
        return paths


def _parse_record(record: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in record.splitlines():
        if line.startswith((" ", "\t")) and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def exact_dependency(depends: str, pattern: str) -> str:
    """The package named in a `Depends:` field that matches `pattern` (a regex)."""
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0]
        if re.fullmatch(pattern, name):
            return name
    raise DebianError(f"no dependency matching {pattern!r} in {depends!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deb_ok(path: Path, sha256: str) -> bool:
    """True when `path` holds the expected .deb. Hashed on every use (~0.2 s for the
    guest's ~100 MB): a file in a shared cache is not trusted for having been right once."""
    return path.is_file() and _sha256(path) == sha256


def _ar_members(deb: bytes, what: str) -> dict[str, bytes]:
    if not deb.startswith(_AR_MAGIC):
        raise DebianError(f"{what}: not a .deb (ar) archive")
    members: dict[str, bytes] = {}
    offset = len(_AR_MAGIC)
    while offset + _AR_HEADER_BYTES <= len(deb):
        header = deb[offset : offset + _AR_HEADER_BYTES]
        try:
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as error:
            raise DebianError(f"{what}: malformed ar member header at byte {offset}") from error
        start = offset + _AR_HEADER_BYTES
        if start + size > len(deb):
            raise DebianError(f"{what}: ar member {name!r} is truncated")
        members[name] = deb[start : start + size]
        offset = start + size + (size % 2)
    return members


def data_tar(deb_path: Path) -> tarfile.TarFile:
    """The archive of a .deb's files (its data.tar.*), open for reading."""
    members = _ar_members(deb_path.read_bytes(), str(deb_path))
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise DebianError(f"{deb_path}: no data.tar member")
    if data_name.endswith(".zst"):
        tar_bytes = _unzstd(members[data_name], deb_path)
    else:
        tar_bytes = members[data_name]  # "r:*" below detects xz, gzip, bzip2
    try:
        return tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:*")
    except tarfile.TarError as error:
        raise DebianError(f"{deb_path}: {data_name} is not a readable tar: {error}") from error


def _unzstd(compressed: bytes, deb_path: Path) -> bytes:
    """A zstd member's bytes: by the `zstandard` module when installed, else by dpkg-deb
    (Python 3.11's stdlib has no zstd). Debian 12's packages, the guest's, are all xz."""
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        zstandard = None
    if zstandard is not None:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed)) as reader:
            data: bytes = reader.read()
            return data
    if shutil.which("dpkg-deb") is None:
        raise DebianError(
            f"{deb_path}: its files are zstd-compressed, and there is neither the Python "
            "module `zstandard` (pip install zstandard) nor dpkg-deb to read them"
        )
    done = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb_path)], capture_output=True, check=False
    )
    if done.returncode != 0:
        raise DebianError(f"dpkg-deb --fsys-tarfile {deb_path}: {done.stderr.decode().strip()}")
    return done.stdout


def extract(deb_path: Path, into: Path) -> None:
    """Unpack a .deb's files (data.tar.*) under `into`, as dpkg would place them."""
    into.mkdir(parents=True, exist_ok=True)
    with data_tar(deb_path) as archive:
        archive.extractall(into, filter="tar")
