"""The guest's package lock: the exact Debian packages of the image, kept in the repo.

One JSON file per architecture (`locks/<arch>.json` beside this module, shipped as
package data): the package names it was resolved from (`requested`), the suites that
were searched, and for each package its name, version, architecture, suite, pool file,
size and SHA256. Every build reads it, with apt or without (harpoon.guest.mirror), so
both fetch the same bytes and build the same image; `harpoon guest build --refresh`
re-resolves it against the archive and rewrites it. `HARPOON_GUEST_LOCK_DIR` points
builds at another directory of locks (tests; a user trying other versions).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harpoon.guest.debian import DebianError, DebPackage

LOCK_DIR_ENV = "HARPOON_GUEST_LOCK_DIR"
LOCK_DIR = Path(__file__).resolve().parent / "locks"
_FIELDS = ("name", "version", "arch", "suite", "filename", "size", "sha256", "depends")
_SHA256 = re.compile(r"[0-9a-f]{64}")
ABOUT = (
    "The exact Debian packages of harpoon's {arch} guest image (harpoon.guest.lock). "
    "`harpoon guest build --refresh` re-resolves and rewrites this file."
)


@dataclass(frozen=True)
class Lock:
    """What one architecture's image is made of, package by package (kernel first)."""

    requested: tuple[str, ...]
    suites: tuple[str, ...]
    packages: tuple[DebPackage, ...]


def lock_dir() -> Path:
    configured = os.environ.get(LOCK_DIR_ENV)
    return Path(configured) if configured else LOCK_DIR


def lock_path(arch: str, directory: Path | None = None) -> Path:
    return (directory or lock_dir()) / f"{arch}.json"


def read(path: Path) -> Lock | None:
    """The lock at `path`, or None when there is none; a malformed one is an error
    naming the file (a build never silently re-resolves what the repo pinned)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise DebianError(f"{path}: unreadable lock: {error}") from error
    try:
        return _lock(data)
    except (KeyError, TypeError, ValueError) as error:
        raise DebianError(f"{path}: malformed lock: {error}") from error


def _lock(data: Any) -> Lock:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    requested = tuple(str(name) for name in data["requested"])
    suites = tuple(str(suite) for suite in data["suites"])
    packages = []
    for entry in data["packages"]:
        unknown = set(entry) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} in {entry.get('name')}")
        package = DebPackage(**entry)
        if not _SHA256.fullmatch(package.sha256):
            raise ValueError(f"{package.name}: sha256 {package.sha256!r} is not a SHA-256")
        if package.suite not in suites:
            raise ValueError(f"{package.name}: suite {package.suite!r} is not one of {suites}")
        packages.append(package)
    return Lock(requested, suites, tuple(packages))


def write(path: Path, lock: Lock, arch: str) -> None:
    """Write `lock` to `path` (atomically: a build reading it sees the old or the new)."""
    document = {
        "about": ABOUT.format(arch=arch),
        "suites": list(lock.suites),
        "requested": list(lock.requested),
        "packages": [
            {field: asdict(package)[field] for field in _FIELDS} for package in lock.packages
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    temporary.replace(path)
