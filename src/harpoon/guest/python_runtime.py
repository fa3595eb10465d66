"""The guest's Python: which stdlib files the agent needs, precompiled, and their libraries.

The module closure is measured, not guessed: a host `python3 -S` imports
`harpoon.agent.main` (plus `EXTRA_MODULES`, for imports made lazily at run time) with
the same sys.path layout as the guest, and reports sys.modules. Each name is then found
in Debian's package tree (a .py, a package, or an extension in lib-dynload); names that
Debian compiles into the interpreter need no file. Sources are shipped only as
sourceless, unchecked-hash .pyc (Debian ships no .pyc; fixed mtimes must not invalidate
them). Shared libraries follow from DT_NEEDED, resolved inside the unpacked tree.

The host interpreter must be CPython 3.11, like the guest's: the .pyc magic must match.
"""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from harpoon.guest import elf

GUEST_PYTHON_VERSION = (3, 11)
GUEST_PYTHON = "python3.11"
GUEST_STDLIB = f"usr/lib/{GUEST_PYTHON}"
GUEST_DYNLOAD = f"{GUEST_STDLIB}/lib-dynload"
CLOSURE_TIMEOUT_S = 120

# Imported at start-up by the interpreter itself, or lazily by code the agent runs
# (so absent from sys.modules after a plain import). Extend when a boot says
# "No module named ...".
EXTRA_MODULES: tuple[str, ...] = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
    "ctypes",
    "concurrent.futures.thread",
    "json",
    "fcntl",
    "termios",
    "pty",
    "tty",
    "resource",
    "errno",
    "traceback",
    # The agent's own lazily imported modules: measured so that their stdlib ships.
    "harpoon.agent.devices",
    "harpoon.agent.modules",
    "harpoon.agent.ps",
)

# Never shipped, and made unimportable while measuring the closure, so the measured set
# is what the guest sees. ssl: the agent speaks no TLS and asyncio imports ssl only if it
# can; it and _hashlib would bring libssl and libcrypto (5.6 MB, a fifth of the image).
# bz2, lzma: shutil imports them only if it can (for archives the agent never makes);
# they would bring libbz2 and their import time.
EXCLUDED_MODULES: tuple[str, ...] = ("ssl", "_ssl", "_hashlib", "bz2", "_bz2", "lzma", "_lzma")

# harpoon's code that runs in the guest: these packages plus the top-level modules
# (shared helpers such as harpoon/errdefs.py), except the host-only ones below.
HARPOON_GUEST_PACKAGES: tuple[str, ...] = ("agent", "ttrpc", "api")
HARPOON_HOST_ONLY_FILES: frozenset[str] = frozenset({"api/regen.py", "cli.py"})

_PYC_FLAG_HASH_BASED = 0b01  # without the check_source bit: the source is never read

MULTIARCH_TRIPLET: Mapping[str, str] = {
    "amd64": "x86_64-linux-gnu",
    "arm64": "aarch64-linux-gnu",
}


class PythonRuntimeError(RuntimeError):
    """The agent's Python closure cannot be built from the unpacked packages."""


def check_host_python() -> None:
    if sys.version_info[:2] != GUEST_PYTHON_VERSION or sys.implementation.name != "cpython":
        raise PythonRuntimeError(
            f"building the guest needs CPython {'.'.join(map(str, GUEST_PYTHON_VERSION))} on "
            f"the host (its .pyc must match the guest's {GUEST_PYTHON}); this is "
            f"{sys.implementation.name} {sys.version.split()[0]}"
        )


_PROBE = """
import importlib, json, sys
sys.path[:0] = json.loads(sys.argv[1])
for name in json.loads(sys.argv[3]):
    sys.modules[name] = None  # "import name" now raises ImportError
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
found = {}
for name, module in sorted(sys.modules.items()):
    if module is None:
        continue
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name != name:
        continue  # an alias such as os.path: the real module is listed under its own name
    origin = getattr(spec, "origin", None) if spec is not None else None
    found[name] = origin if origin not in (None, "built-in", "frozen") else None
print("\\nHARPOON-CLOSURE " + json.dumps(found))
"""


def imported_modules(
    python_path: Iterable[Path],
    entry: str,
    extra: Iterable[str] = EXTRA_MODULES,
    excluded: Iterable[str] = EXCLUDED_MODULES,
) -> dict[str, str | None]:
    """Every module importing `entry` and `extra` loads, with `excluded` unimportable:
    name -> host file (None: built in)."""
    done = subprocess.run(
        [
            sys.executable,
            "-S",
            "-E",
            "-c",
            _PROBE,
            json.dumps([str(p) for p in python_path]),
            json.dumps([entry, *extra]),
            json.dumps(list(excluded)),
        ],
        capture_output=True,
        text=True,
        timeout=CLOSURE_TIMEOUT_S,
        check=False,
        # Pure-Python protobuf imports more of the stdlib than upb does: measuring it
        # ships a superset, so a guest whose upb extension fails to load still works.
        env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"},
    )
    marker = "HARPOON-CLOSURE "
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if done.returncode != 0 or not lines:
        raise PythonRuntimeError(
            f"importing {entry} in a host `python3 -S` failed: {done.stderr.strip()[-2000:]}"
        )
    result: dict[str, str | None] = json.loads(lines[-1][len(marker) :])
    return result


def compile_pyc(source: bytes, guest_path: str) -> bytes:
    """A sourceless, unchecked-hash .pyc of `source`; tracebacks name `guest_path`."""
    code = compile(source, guest_path, "exec", dont_inherit=True)
    return (
        importlib.util.MAGIC_NUMBER
        + struct.pack("<I", _PYC_FLAG_HASH_BASED)
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def resolve_in_root(root: Path, guest_path: str) -> Path:
    """The host file that `guest_path` names inside the tree `root`, following symlinks
    (absolute ones relative to `root`, never to the host's /)."""
    pending = [p for p in guest_path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise PythonRuntimeError(f"symlink loop at {guest_path} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
        else:
            resolved.append(part)
    return root.joinpath(*resolved)


def stdlib_files(
    modules: Mapping[str, str | None], root: Path, arch: str
) -> tuple[dict[str, Path], list[str]]:
    """Guest path -> host file for each stdlib module (sources as .py, to be compiled),
    and the names assumed built into the guest's interpreter."""
    triplet = MULTIARCH_TRIPLET[arch]
    interpreter = (root / "usr/bin" / GUEST_PYTHON).read_bytes()
    files: dict[str, Path] = {}
    builtin: list[str] = []
    for name, host_file in sorted(modules.items()):
        if name == "__main__" or name.split(".")[0] in ("harpoon", "google"):
            continue
        relative = name.replace(".", "/")
        candidates = [
            f"{GUEST_STDLIB}/{relative}.py",
            f"{GUEST_STDLIB}/{relative}/__init__.py",
            f"{GUEST_DYNLOAD}/{name}.cpython-311-{triplet}.so",
        ]
        found = next((c for c in candidates if (root / c).is_file()), None)
        if found is not None:
            files[found] = root / found
        elif host_file is None or host_file.endswith(".so"):
            # Built into Debian's interpreter (Debian links many extensions statically).
            if host_file is not None and f"PyInit_{name}".encode() not in interpreter:
                raise PythonRuntimeError(
                    f"extension module {name} is neither in {GUEST_DYNLOAD} nor built into "
                    f"{GUEST_PYTHON}: add the Debian package that ships it"
                )
            builtin.append(name)
        else:
            raise PythonRuntimeError(
                f"module {name} (host: {host_file}) is not in Debian's {GUEST_PYTHON} "
                "packages: ship it with harpoon or add the Debian package that has it"
            )
    return files, builtin


def harpoon_sources(src_root: Path) -> dict[str, Path]:
    """Path relative to the harpoon package -> source file, for the code the guest runs."""
    package = src_root / "harpoon"
    paths = sorted(package.glob("*.py"))
    for sub in HARPOON_GUEST_PACKAGES:
        paths += sorted((package / sub).rglob("*.py"))
    files = {p.relative_to(package).as_posix(): p for p in paths}
    return {name: path for name, path in files.items() if name not in HARPOON_HOST_ONLY_FILES}


def unshipped_harpoon_modules(modules: Iterable[str], shipped: Iterable[str]) -> list[str]:
    """The harpoon modules in `modules` that no file in `shipped` (harpoon_sources keys)
    provides: the agent must not import host-only code (shim, vmm, guest, cli...)."""
    provided = {"harpoon"}
    for name in shipped:
        dotted = name.removesuffix(".py").replace("/", ".")
        provided.add("harpoon." + dotted.removesuffix(".__init__"))
        parts = dotted.split(".")
        provided.update("harpoon." + ".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(n for n in modules if n.split(".")[0] == "harpoon" and n not in provided)


def library_closure(
    root: Path, binaries: Iterable[str], arch: str
) -> tuple[dict[str, Path], dict[str, str]]:
    """The dynamic loader and every shared library that `binaries` (guest paths) need,
    transitively: guest path -> host file, and guest path -> symlink target (the
    loader's well-known path points at the real file, which is shipped once)."""
    triplet = MULTIARCH_TRIPLET[arch]
    search = [f"lib/{triplet}", f"usr/lib/{triplet}", "lib", "usr/lib"]
    result: dict[str, Path] = {}
    links: dict[str, str] = {}
    pending = list(binaries)
    seen: set[str] = set()
    while pending:
        guest = pending.pop()
        if guest in seen:
            continue
        seen.add(guest)
        data = resolve_in_root(root, guest).read_bytes()
        loader = elf.interpreter(data, guest)
        if loader is not None:
            real = resolve_in_root(root, loader)
            real_guest = real.relative_to(root).as_posix()
            result[real_guest] = real
            if real_guest != loader.lstrip("/"):
                links[loader.lstrip("/")] = "/" + real_guest
        for soname in elf.needed(data, guest):
            location = next(
                (
                    f"{d}/{soname}"
                    for d in search
                    if resolve_in_root(root, f"{d}/{soname}").is_file()
                ),
                None,
            )
            if location is None:
                raise PythonRuntimeError(
                    f"{guest} needs {soname}, which no unpacked package provides: add the "
                    "Debian package that ships it to the guest's package list"
                )
            result[location] = resolve_in_root(root, location)
            pending.append(location)
    return result, links
