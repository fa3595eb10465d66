"""`--baseline-commit REV`: harpoon at another commit, measured beside this one.

`Baseline.prepare()` puts the commit's `src/` (`git archive`) in a temporary directory,
compiles its bytecode (as `machine.compile_harpoon` does for this tree), builds its own
guest image and, unless templates are off, its own VM template there (with that
commit's `harpoon guest build` / `harpoon template build`), and writes a shim
executable `containerd-shim-harpoon<short>-v1` into `bin/`, which the benchmark puts on
the throw-away containerd's PATH: containerd turns the runtime name
`io.containerd.harpoon<short>.v1` into that binary name (the last two dot-separated
parts).

The executable is a copy of pip's console script `containerd-shim-harpoon-v1` (same
interpreter, same `harpoon.shim.cli:main`) that first sets `HARPOON_GUEST_DIR`,
`HARPOON_TEMPLATE_DIR` and `PYTHONPATH` and puts the commit's `src/` first on
`sys.path`. containerd runs it for `start` and `delete`, the daemon is a fork of
`start`, and the template builder a `python -m` child: all of them run the commit's
code with its own guest and templates, so the two versions never share a guest image
or a VM template (the agent's API differs between commits). `HARPOON_RUN_DIR` stays
shared: the per-container directories under it are named after unique container IDs,
and the accelerator cache in it is the same probe. `HARPOON_TEMPLATES=off` reaches it
like the current shim (containerd passes its environment on).

`cleanup()` (after the daemon is stopped) runs the commit's own `shim delete` for any
of its containers whose VM or share directory is left (what containerd would have done
for a shim it lost), kills what still runs from the temporary directory (a template
builder and its VM) and removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.checkout import wrapper_shim
from harpoon.devenv.host import unmount_under
from harpoon.shim.paths import share_dir, vm_state_dir

#: `git archive` of src/, `guest build` (~10 s here) and `template build` (a cold boot).
BUILD_TIMEOUT_S = 900.0
#: A leftover container's `shim delete`.
DELETE_TIMEOUT_S = 30.0
#: How long processes still running from the temporary directory get to die.
KILL_WAIT_S = 5.0


class BaselineError(RuntimeError):
    """The commit could not be checked out, built or made into a runtime."""


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=False, timeout=60
    )
    if out.returncode != 0:
        raise BaselineError(f"`git {' '.join(args)}` failed: {out.stderr.strip()}")
    return out.stdout.strip()


class Baseline:
    """harpoon at `rev`, runnable as its own containerd runtime (see the module doc)."""

    def __init__(self, repo: Path, rev: str, *, templates: bool) -> None:
        self.repo = repo
        self.rev = rev
        self.commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
        self.short = _git(repo, "rev-parse", "--short=7", self.commit)
        self.templates = templates
        #: Figure label, e.g. `harpoon@2c20733`.
        self.label = f"harpoon@{self.short}"
        #: containerd's runtime name and the shim binary it looks up on PATH.
        self.runtime = f"io.containerd.harpoon{self.short}.v1"
        self.binary = f"containerd-shim-harpoon{self.short}-v1"
        self.directory: Path | None = None
        self.guest_digest: str | None = None
        self.stale_bytecode_compiled = 0
        self.template: str | None = None

    def describe(self) -> dict[str, Any]:
        """What the report and the JSON say about it."""
        return {
            "rev": self.rev, "commit": self.commit, "label": self.label,
            "runtime": self.runtime, "guest_digest": self.guest_digest,
            "template": self.template, "stale_bytecode_compiled": self.stale_bytecode_compiled,
        }  # fmt: skip

    @property
    def base(self) -> Path:
        assert self.directory is not None, "prepare() first"
        return self.directory

    @property
    def src(self) -> Path:
        return self.base / "src"

    @property
    def bin_dir(self) -> Path:
        return self.base / "bin"

    @property
    def guest_dir(self) -> Path:
        return self.base / "guest"

    @property
    def template_dir(self) -> Path:
        return self.base / "templates"

    def environment(self) -> dict[str, str]:
        """What the commit's shim and CLI run with (on top of the benchmark's own)."""
        python_path = [str(self.src), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {
            "PYTHONPATH": os.pathsep.join(python_path),
            "HARPOON_GUEST_DIR": str(self.guest_dir),
            "HARPOON_TEMPLATE_DIR": str(self.template_dir),
        }

    def prepare(self, say: Callable[[str], None]) -> None:
        """Checks the commit out, compiles, builds its guest and template, writes its shim."""
        self.directory = Path(tempfile.mkdtemp(prefix=f"hp-bench-{self.short}-"))
        archive = subprocess.run(
            ["git", "archive", "--format=tar", self.commit, "src"],
            cwd=self.repo, capture_output=True, check=False, timeout=BUILD_TIMEOUT_S,
        )  # fmt: skip
        if archive.returncode != 0:
            raise BaselineError(f"git archive {self.commit} src: {archive.stderr.decode()}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(self.base, filter="tar")
        if not (self.src / "harpoon" / "shim" / "cli.py").is_file():
            raise BaselineError(f"{self.rev}: no src/harpoon/shim/cli.py")
        self.stale_bytecode_compiled = self._compile()
        say(f"baseline {self.label}: building its guest image in {self.guest_dir}")
        built = self._harpoon("guest", "build", "--guest-dir", str(self.guest_dir))
        self.guest_digest = next(
            (line.split()[1] for line in built.splitlines() if line.startswith("digest ")), None
        )
        if self.templates:
            say(f"baseline {self.label}: building its VM template in {self.template_dir}")
            self.template = self._template_build()
        self._write_shim()

    def _compile(self) -> int:
        """Compiles the commit's modules to bytecode; returns how many were stale (all)."""
        import compileall
        import importlib.util

        package = self.src / "harpoon"
        stale = sum(
            not Path(importlib.util.cache_from_source(str(source))).exists()
            for source in package.rglob("*.py")
        )
        with contextlib.redirect_stdout(io.StringIO()):
            compileall.compile_dir(package, quiet=1)
        return stale

    def _harpoon(self, *args: str) -> str:
        """`harpoon ARGS` of the commit (its CLI, its code); its stdout."""
        out = subprocess.run(
            [sys.executable, "-m", "harpoon.cli", *args],
            env={**os.environ, **self.environment()}, cwd=self.base,
            capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S,
        )  # fmt: skip
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip()[-800:]
            raise BaselineError(f"{self.label}: `harpoon {' '.join(args)}` failed: {tail}")
        return out.stdout

    def _template_build(self) -> str:
        out = self._harpoon(
            "template", "build", "--guest-dir", str(self.guest_dir),
            "--template-dir", str(self.template_dir),
        )  # fmt: skip
        return " ".join(out.split())

    async def ensure_template(self) -> str:
        """The commit's template, built again or waited for (its CLI takes the build lock
        the shim's background builder holds); says which, or why there is none."""
        if not self.templates:
            return f"{self.label}: VM templates are off"
        try:
            self.template = await asyncio.to_thread(self._template_build)
        except (BaselineError, subprocess.TimeoutExpired) as error:
            return f"{self.label}: no VM template ({error}): its runs will boot cold"
        return f"{self.label}: {self.template}"

    def _write_shim(self) -> None:
        """The commit's shim: its source first, its own guest and template directories."""
        self.bin_dir.mkdir()
        note = f"harpoon at {self.commit}, for `python -m bench --baseline-commit`."
        wrapper_shim(self.bin_dir, f"harpoon{self.short}", self.environment(), self.src, note)

    def cleanup(self, namespace: str, address: str, container_ids: list[str]) -> list[str]:
        """After the daemon stopped: releases what the commit's leaked shims left, kills
        what still runs from the temporary directory, removes it. Returns what it did."""
        if self.directory is None:
            return []
        done = []
        shim = self.bin_dir / self.binary
        for container_id in container_ids:
            state, share = vm_state_dir(namespace, container_id), share_dir(namespace, container_id)
            if shim.exists() and (state.exists() or share.exists()):
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run(
                        [str(shim), "-namespace", namespace, "-address", address,
                         "-id", container_id, "-bundle", str(self.base), "delete"],
                        cwd=self.base, capture_output=True, timeout=DELETE_TIMEOUT_S,
                        check=False,
                    )  # fmt: skip
                done.append(f"{self.label} shim delete {container_id}")
        killed = _kill_processes_under(self.base)
        if killed:
            done.append(f"killed pids {killed} running from {self.base}")
        done.extend(f"unmounted {m}" for m in unmount_under(self.base))
        shutil.rmtree(self.base, ignore_errors=True)
        self.directory = None
        return done


def _kill_processes_under(base: Path) -> list[int]:
    """SIGKILLs the processes whose command line names a path under `base` (a template
    builder of the commit and its QEMU); returns their pids."""
    prefix = os.fsencode(str(base) + "/")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if prefix in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                pids.append(int(entry))
    deadline = time.monotonic() + KILL_WAIT_S
    while pids and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    return pids
