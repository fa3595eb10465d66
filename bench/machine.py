"""What the benchmarks ran on: the host, QEMU, the accelerator, the code's git commit.

Reads /proc, asks binaries for their versions and git for the commit; changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from harpoon.vmm import accel
from harpoon.vmm.backend import host_arch
from harpoon.vmm.qemu_launch import DEFAULT_MACHINE, PROFILES

#: A version query that takes longer than this is reported as unknown.
VERSION_TIMEOUT_S = 10.0


def _first_line(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, cwd=cwd, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if out.returncode == 0 and lines else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def qemu_binary() -> str | None:
    """The QEMU binary harpoon uses for this host's guests (on PATH)."""
    arch = host_arch()
    profile = PROFILES.get((arch, DEFAULT_MACHINE.get(arch, "")))
    return shutil.which(profile.binary) if profile else None


def accelerator() -> str:
    """The accelerator harpoon's VMs get (the same probe and cache the shim uses)."""
    qemu = qemu_binary()
    return accel.choose(qemu) if qemu else "unknown"


def git_commit(repo: Path) -> dict[str, Any]:
    """HEAD and the files that differ from it (read-only git commands)."""
    commit = _first_line(["git", "rev-parse", "HEAD"], cwd=repo)
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, cwd=repo, check=False,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        status = []
    return {"commit": commit, "dirty": bool(status), "modified": [s[3:] for s in status]}


def describe(repo: Path) -> dict[str, Any]:
    """Everything the report says about the machine and the code under test."""
    qemu = qemu_binary()
    return {
        "nproc": os.cpu_count(),
        "memory_mib": memory_mib(),
        "cpu_model": cpu_model(),
        "kernel": " ".join(platform.uname()[2:4]),
        "os": _os_release(),
        "qemu": _first_line([qemu, "--version"]) if qemu else None,
        "accelerator": accelerator(),
        "runc": _first_line(["runc", "--version"]),
        "python": platform.python_version(),
        "git": git_commit(repo),
    }


def _os_release() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return None


def compile_harpoon() -> int:
    """Compiles harpoon's modules to bytecode, as installing a package does; returns how
    many were stale. Under PYTHONDONTWRITEBYTECODE=1 (set on our machines) a checkout's
    edited modules are otherwise compiled again by every shim process: ~60 ms a start."""
    import compileall
    import importlib.util
    import io

    import harpoon

    package = Path(harpoon.__file__).parent
    stale = 0
    for source in package.rglob("*.py"):
        cached = Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
            stale += 1
    with contextlib.redirect_stdout(io.StringIO()):
        compileall.compile_dir(package, quiet=1)
    return stale
