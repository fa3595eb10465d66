"""`harpoon doctor`: every piece harpoon needs, checked, one line each, with the exact
command that fixes a missing one.

The checks are one table (`CHECKS`): a name, whether harpoon cannot run containers
without it (`required`: doctor exits 1 if one of those is missing), a probe and the fix.
A probe only looks (files, PATH, the VMM's accelerator probe, cached per boot): it never
builds, installs or starts anything. Each finds its piece the way harpoon itself does
(harpoon.system.config, harpoon.net.gvproxy, harpoon.vmm), so the variables that move or
name a piece (HARPOON_NERDCTL, HARPOON_CNI_PATH, HARPOON_TOOLS_DIR, HARPOON_GUEST_DIR…)
move what doctor checks, and a test can hide one piece.

The table is Linux's. On macOS (`checks_for`) a Mac's own checks replace containerd's,
nerdctl's, CNI's and the rest (harpoon.system.doctor_macos).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harpoon import dirs
from harpoon.system import config

if TYPE_CHECKING:
    from harpoon.vmm.backend import HostVMM

#: The command that installs or builds every missing tool (from the repository).
INSTALL_DEPS = "bash scripts/install-deps"


@dataclass(frozen=True)
class Finding:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Check:
    name: str
    required: bool
    probe: Callable[[], Finding]
    #: The command that fixes it (or what computes it, for the host's).
    fix: str | Callable[[], str]

    def fix_command(self) -> str:
        return self.fix if isinstance(self.fix, str) else self.fix()


@dataclass(frozen=True)
class Result:
    check: Check
    finding: Finding

    @property
    def line(self) -> str:
        if self.finding.ok:
            return f"ok       {self.check.name}: {self.finding.detail}"
        word = "MISSING " if self.check.required else "missing "
        return f"{word} {self.check.name}: {self.finding.detail}; fix: {self.check.fix_command()}"


def _found(path: str | Path | None, what: str) -> Finding:
    return Finding(True, str(path)) if path else Finding(False, f"no {what}")


def probe_vmm() -> Finding:
    from harpoon.vmm.backend import default_backend
    from harpoon.vmm.choice import BackendChoiceError

    try:
        backend = default_backend()
    except BackendChoiceError as error:
        return Finding(False, str(error))
    return vmm_finding(backend.host_vmm(), f"{backend.name} backend: ")


def vmm_finding(vmm: HostVMM, label: str = "") -> Finding:
    """A backend's VMM as doctor reports it, on Linux and on macOS."""
    if vmm.path is None:
        return Finding(False, f"{label}no {vmm.program} on PATH")
    note = " (no hardware acceleration: guests run slowly)" if vmm.accelerator == "tcg" else ""
    accelerator = f", accelerator {vmm.accelerator}" if vmm.accelerator else ""
    return Finding(True, f"{label}{vmm.path}{accelerator}{note}")


def vmm_fix() -> str:
    from harpoon.vmm.backend import default_backend
    from harpoon.vmm.choice import BackendChoiceError

    try:
        return default_backend().host_vmm().install_hint
    except BackendChoiceError:
        return "set HARPOON_VMM (or [vmm] backend in harpoon's config file) to qemu or vfkit"


def probe_guest() -> Finding:
    from harpoon.guest import cache

    try:
        image = cache.find_guest()
    except (cache.GuestNotBuiltError, ValueError) as error:
        return Finding(False, str(error).split(":", 1)[0])
    return Finding(True, f"{image.arch} {image.digest[:16]} in {dirs.guest_dir()}")


def probe_templates() -> Finding:
    from harpoon.sandbox.template import META_NAME

    store = Path(dirs.template_dir())
    count = len(list(store.glob(f"*/{META_NAME}")))
    if not count:
        return Finding(False, f"none in {store} (containers boot cold until one is built)")
    return Finding(True, f"{count} in {store}")


def probe_containerd() -> Finding:
    choice = config.find_containerd()
    return Finding(False, choice) if isinstance(choice, str) else Finding(True, choice.origin)


def probe_nerdctl() -> Finding:
    return _found(config.find_nerdctl(), f"nerdctl (${config.NERDCTL_ENV}, built or on PATH)")


def probe_cni() -> Finding:
    directory = config.find_cni_plugin_dir()
    missing = config.missing_cni_plugins(directory)
    if missing:
        where = directory or " or ".join(map(str, config.CNI_PLUGIN_DIRS))
        return Finding(False, f"no {', '.join(missing)} in {where}")
    return Finding(True, f"{', '.join(config.CNI_PLUGINS)} in {directory}")


def probe_shim() -> Finding:
    from harpoon.devenv.tools import installed_shim

    return _found(installed_shim(), "containerd-shim-harpoon-v1 beside this Python or on PATH")


def probe_iptables() -> Finding:
    path = shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")
    return _found(path, "iptables (CNI's portmap and firewall plugins run it)")


def probe_gvproxy() -> Finding:
    from harpoon.net import gvproxy

    return _found(gvproxy.find(), "gvproxy (the network of --net host containers)")


def probe_virtiofsd() -> Finding:
    from harpoon.vmm import virtiofsd

    return _found(virtiofsd.find(), "virtiofsd (virtiofs shares; 9p works without it)")


def probe_buildkitd() -> Finding:
    """buildkitd and buildctl as `harpoon build` finds them (harpoon.system.config), and
    whether harpoon's buildkitd runs (its status: started by `harpoon build`)."""
    from harpoon.system import buildkitd, services
    from harpoon.system.layout import Layout

    found = config.find_buildkit()
    if isinstance(found, str):
        return Finding(False, f"{found} (for `harpoon build`)")
    choice = config.find_containerd()
    if isinstance(choice, str):
        return Finding(True, f"{found.buildkitd}, {found.buildctl}")
    state = services.status_of(buildkitd.service(Layout.current(), choice, found))
    running = (f"running, pid {state.pid}" if state.healthy
               else "not running (harpoon build starts it)" if state.pid is None
               else f"pid {state.pid} does not answer on {state.socket}")  # fmt: skip
    return Finding(state.ok, f"{found.buildkitd}, {found.buildctl}; {running}; log {state.log}")


CHECKS: tuple[Check, ...] = (
    Check("VMM", True, probe_vmm, vmm_fix),
    Check("guest image", True, probe_guest, "harpoon guest build"),
    Check("VM templates", False, probe_templates, "harpoon template build"),
    Check("shim", True, probe_shim, "pip install -e . (or " + INSTALL_DEPS + ")"),
    Check("containerd", True, probe_containerd,
          f"{INSTALL_DEPS} (builds containerd 2.3 from source)"),
    Check("nerdctl", True, probe_nerdctl, f"{INSTALL_DEPS} (builds nerdctl v2.3.5)"),
    Check("CNI plugins", True, probe_cni, "apt-get install containernetworking-plugins"),
    Check("iptables", True, probe_iptables, "apt-get install iptables"),
    Check("gvproxy", False, probe_gvproxy, f"{INSTALL_DEPS} (builds gvproxy v0.8.9)"),
    Check("virtiofsd", False, probe_virtiofsd, f"{INSTALL_DEPS} (cargo install virtiofsd)"),
    Check("buildkitd", False, probe_buildkitd,
          f"{INSTALL_DEPS} (builds buildkitd and buildctl v0.32.2)"),
)  # fmt: skip


def checks_for(
    platform: str | None = None, containerd_config: Path | None = None
) -> tuple[Check, ...]:
    """The checks of `platform` (sys.platform's word; default this host's): CHECKS on
    Linux; on macOS the guest's and the shim's, then the Mac's own
    (harpoon.system.doctor_macos), containerd's config read from `containerd_config`
    when given."""
    if (platform or sys.platform) != "darwin":
        return CHECKS
    from harpoon.system.doctor_macos import MacChecks, MacHost

    common = tuple(c for c in CHECKS if c.name in ("guest image", "VM templates", "shim"))
    return common + MacChecks(MacHost(), containerd_config).checks()


def examine(checks: tuple[Check, ...] | None = None) -> list[Result]:
    """Each check's finding (default: this host's checks_for)."""
    if checks is None:
        checks = checks_for()
    results = []
    for check in checks:
        try:
            finding = check.probe()
        except OSError as error:  # a directory root alone may read
            finding = Finding(False, f"could not look: {error}")
        results.append(Result(check, finding))
    return results


def healthy(results: list[Result]) -> bool:
    """No required piece missing."""
    return all(r.finding.ok for r in results if r.check.required)


def euid_note() -> str | None:
    return None if os.geteuid() == 0 else "not root: harpoon's services and VMs need root"
