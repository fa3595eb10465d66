"""This checkout's harpoon as a benchmark's own runtime: a guest image and a VM template
store built for the benchmark in its scratch directory, and wrapper shims that run this
checkout's harpoon with them.

Other sessions on the machine may rebuild the machine-wide guest while a benchmark runs:
a benchmark's shims never read it. A wrapper shim is `containerd-shim-<name>-v1` in a
directory the benchmark puts first on its containerd's PATH, so that containerd's
runtime `io.containerd.<name>.v1` runs it (bench/share.py has one per share variant).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.tools import installed_shim
from harpoon.guest.cache import GUEST_DIR_ENV
from harpoon.sandbox.template import TEMPLATE_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
#: `harpoon guest build` (~10 s) and `harpoon template build` (a cold boot per network
#: kind: the host's, or a namespace of its own).
BUILD_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class HarpoonDirs:
    """The benchmark's own guest image and template store, and what built them."""

    guest: Path
    templates: Path
    built: dict[str, str]

    def environment(self) -> dict[str, str]:
        """What a shim (and `harpoon` itself) runs with to use this checkout and them."""
        return {
            "PYTHONPATH": str(REPO / "src"),
            GUEST_DIR_ENV: str(self.guest),
            TEMPLATE_DIR_ENV: str(self.templates),
        }


def prepare_harpoon(scratch: Path, template: bool) -> HarpoonDirs:
    """Builds this checkout's guest into scratch/guest and, if asked, the VM templates
    containers restore into scratch/templates (`harpoon template build`, as a user
    would)."""
    guest, templates = scratch / "guest", scratch / "templates"
    built = {"guest": harpoon_cli("guest", "build", "--guest-dir", str(guest))}
    if template:
        built["template"] = harpoon_cli(
            "template", "build", "--guest-dir", str(guest), "--template-dir", str(templates)
        )
    return HarpoonDirs(guest, templates, built)


def harpoon_cli(*args: str) -> str:
    """`harpoon ARGS` of this checkout; its stdout, on one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "harpoon.cli", *args],
        env=env, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip()[-800:]
        raise SystemExit(f"`harpoon {' '.join(args)}` failed: {tail}")
    return " ".join(out.stdout.split())


def wrapper_shim(
    directory: Path, name: str, env: dict[str, str], src: Path = REPO / "src", note: str = ""
) -> str:
    """Writes `containerd-shim-<name>-v1` into directory: pip's console script for
    containerd-shim-harpoon-v1 (the same interpreter, the same `harpoon.shim.cli:main`)
    with src first on sys.path and env set at its top, so that every process of the
    shim (`start`, the daemon it forks, `delete`, the template builder, a `python -m`
    child) runs that code with env, and is known by its script's name (harpoon's
    cleanup and harpoon.devenv find shims so). Returns containerd's runtime name."""
    installed = installed_shim()
    interpreter = sys.executable
    if installed is not None:
        first = installed.read_text().splitlines()[0]
        if first.startswith("#!"):
            interpreter = first[2:].strip()
    script = directory / f"containerd-shim-{name}-v1"
    script.write_text(
        f"#!{interpreter}\n"
        "# -*- coding: utf-8 -*-\n" + (f"# {note}\n" if note else "") + "import os\n"
        f"os.environ.update({env!r})\n"
        "import re\n"
        "import sys\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        "from harpoon.shim.cli import main\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        "    sys.exit(main())\n"
    )
    script.chmod(0o755)
    return f"io.containerd.{name}.v1"
