"""Debian packages for the guest: resolve exact versions, download and unpack .debs.

apt runs against a private state directory per architecture (its own package lists,
an empty dpkg status, `APT::Architecture` set to the guest's), so an arm64 guest is
built on an amd64 host without `dpkg --add-architecture` and without touching the
host's apt state. Sources come from the host's apt configuration.

Unpacking is done in Python (ar, then tar with xz/gzip/bzip2, or zstd via
`dpkg-deb --fsys-tarfile`). Nothing here installs a package on the host.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
            )
            found.setdefault(package.name, package)
        missing = [n for n in names if n not in found]
        if missing:
            raise DebianError(f"apt knows no {self.arch} package {', '.join(missing)}")
        return [found[n] for n in names]

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
        missing = [p for p in packages if not _deb_ok(into / p.deb_name, p.sha256)]
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
            if not _deb_ok(path, package.sha256):
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


def _deb_ok(path: Path, sha256: str) -> bool:
    """True when `path` holds the expected .deb (checked once, remembered in a stamp)."""
    stamp = path.with_name(path.name + ".sha256")
    if not path.exists():
        return False
    if stamp.exists() and stamp.read_text() == sha256:
        return True
    if _sha256(path) != sha256:
        return False
    stamp.write_text(sha256)
    return True


def _ar_members(deb: bytes, what: str) -> dict[str, bytes]:
    if not deb.startswith(_AR_MAGIC):
        raise DebianError(f"{what}: not a .deb (ar) archive")
    members: dict[str, bytes] = {}
    offset = len(_AR_MAGIC)
    while offset + _AR_HEADER_BYTES <= len(deb):
        header = deb[offset : offset + _AR_HEADER_BYTES]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        start = offset + _AR_HEADER_BYTES
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
        tar_bytes = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb_path)], capture_output=True, check=True
        ).stdout
    else:
        tar_bytes = members[data_name]  # "r:*" below detects xz, gzip, bzip2
    return tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:*")


def extract(deb_path: Path, into: Path) -> None:
    """Unpack a .deb's files (data.tar.*) under `into`, as dpkg would place them."""
    into.mkdir(parents=True, exist_ok=True)
    with data_tar(deb_path) as archive:
        archive.extractall(into, filter="tar")
