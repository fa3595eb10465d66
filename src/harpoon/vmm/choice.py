"""Which VMM backend runs harpoon's VMs: the user's choice, else the platform's default.

The choice, first that says one:
1. $HARPOON_VMM: a backend's name (`qemu`, `vfkit`);
2. harpoon's config file, $HARPOON_CONFIG or /etc/harpoon/config.toml (TOML), whose
   `[vmm]` table may say `backend = "vfkit"` and where vfkit is, `vfkit = "/path"`
   ($HARPOON_VFKIT wins over it);
3. the platform's default: QEMU, on Linux (KVM, else TCG) and on macOS too (HVF).
   On macOS because VM templates work there and not through vfkit: a container's VM
   restored from a template starts far faster than one booted cold, and vfkit cannot
   save or restore a guest (vfkit issue #449), so through vfkit every container boots
   cold. That holds until a real Mac's smoke-script results say otherwise.

A value that names no backend, a config file that cannot be read or has keys harpoon
does not know in `[vmm]` is an error naming the variable or file and what it may say:
a VMM the user did not choose must never run silently.

This runs in every shim's start (harpoon.shim.start, harpoon.shim.prestart): it imports
os alone unless a config file exists (tomllib, then): NamedTuples, not dataclasses,
which would load inspect on start's way to its answer.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

#: Every backend harpoon has (harpoon.vmm.backend makes them).
BACKEND_NAMES = ("qemu", "vfkit")
VMM_ENV = "HARPOON_VMM"
CONFIG_ENV = "HARPOON_CONFIG"
DEFAULT_CONFIG_FILE = "/etc/harpoon/config.toml"
VMM_TABLE = "vmm"
#: The keys of the config file's [vmm] table.
BACKEND_KEY = "backend"
VFKIT_KEY = "vfkit"
PLATFORM_DEFAULT = "qemu"


class BackendChoiceError(ValueError):
    """The user's choice of backend cannot be followed: the message names where it was
    made and what it may say."""


class Choice(NamedTuple):
    name: str
    origin: str
    """Where the choice was made: $HARPOON_VMM, the config file's path, or the platform."""
    vfkit: str | None = None
    """The vfkit program the config file names, if it does."""


def choose(names: tuple[str, ...]) -> Choice:
    """The backend to run, one of names (see the module's docstring)."""
    settings = read_config()
    vfkit = settings.vfkit if settings is not None else None
    named = os.environ.get(VMM_ENV)
    if named:
        if named not in names:
            raise BackendChoiceError(
                f"{VMM_ENV}={named!r} names no VMM backend: use one of {', '.join(names)}"
            )
        return Choice(named, f"${VMM_ENV}", vfkit)
    if settings is not None and settings.backend is not None:
        if settings.backend not in names:
            raise BackendChoiceError(
                f"{settings.path}: [{VMM_TABLE}] {BACKEND_KEY} = {settings.backend!r} names no "
                f"VMM backend: use one of {', '.join(names)}"
            )
        return Choice(settings.backend, settings.path, vfkit)
    return Choice(PLATFORM_DEFAULT, "the platform's default", vfkit)


class VmmSettings(NamedTuple):
    """The config file's [vmm] table."""

    path: str
    backend: str | None = None
    vfkit: str | None = None


def config_path() -> tuple[str, bool]:
    """The config file's path, and whether the user named it ($HARPOON_CONFIG)."""
    named = os.environ.get(CONFIG_ENV)
    return (named, True) if named else (DEFAULT_CONFIG_FILE, False)


def read_config() -> VmmSettings | None:
    """The config file's [vmm] table; None when there is no config file (the default
    one need not exist; one $HARPOON_CONFIG names must)."""
    path, named = config_path()
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        if named:
            raise BackendChoiceError(f"{CONFIG_ENV}={path!r}: no such file") from None
        return None
    except OSError as error:
        raise BackendChoiceError(f"harpoon's config file {path}: {error}") from None
    return parse_config(path, data)


def parse_config(path: str, data: bytes) -> VmmSettings:
    """The [vmm] table of a config file's contents (pure)."""
    import tomllib

    try:
        document = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise BackendChoiceError(f"{path} is not TOML: {error}") from None
    table: Any = document.get(VMM_TABLE, {})
    if not isinstance(table, dict):
        raise BackendChoiceError(f"{path}: {VMM_TABLE} must be a table ([{VMM_TABLE}])")
    unknown = sorted(set(table) - {BACKEND_KEY, VFKIT_KEY})
    if unknown:
        raise BackendChoiceError(
            f"{path}: [{VMM_TABLE}] has no key {', '.join(map(repr, unknown))}: "
            f'it may say {BACKEND_KEY} = "qemu" or "vfkit", and {VFKIT_KEY} = "/path/to/vfkit"'
        )
    for key in (BACKEND_KEY, VFKIT_KEY):
        if key in table and not (isinstance(table[key], str) and table[key]):
            raise BackendChoiceError(
                f"{path}: [{VMM_TABLE}] {key} must be a non-empty string, not {table[key]!r}"
            )
    return VmmSettings(path, table.get(BACKEND_KEY), table.get(VFKIT_KEY))
