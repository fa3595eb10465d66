"""Which filesystem a VM's shares use (harpoon.sandbox.plan), and a dead VM's virtiofsd
found and killed by `delete` (harpoon.vmm.leftovers)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harpoon.sandbox import plan
from harpoon.sandbox.template import TemplateStore
from harpoon.vmm import leftovers
from harpoon.vmm.backend import Backend
from harpoon.vmm.base import VirtualMachine, VMConfig
from harpoon.vmm.devices import Share


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, virtiofs: bool = True) -> None:
        self.virtiofs = virtiofs

    def new_vm(self, config: VMConfig) -> VirtualMachine:
        raise NotImplementedError

    def template_identity(self, config: VMConfig) -> dict[str, Any] | None:
        return {"layout": config.layout()}

    def serves_virtiofs(self) -> bool:
        return self.virtiofs

    def launch_early(self, config: VMConfig, restoring: Path | None) -> None:
        raise NotImplementedError

    async def discard_early(self) -> None:
        pass


def config() -> VMConfig:
    return VMConfig(
        name="c1",
        arch="amd64",
        kernel=Path("/g/vmlinux"),
        initrd=Path("/g/initrd"),
        state_dir=Path("/s"),
        shares=(Share("rootfs", Path("/b")),),
    )


def fs_of(launch: plan.LaunchPlan) -> str:
    return launch.config.shares[0].fs


def test_9p_everywhere_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plan.SHARE_FS_ENV, "9p")
    assert fs_of(plan.plan_launch(config(), FakeBackend(), False)) == "9p"


def test_virtiofs_when_asked_boots_cold_without_a_template(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(plan.SHARE_FS_ENV, "virtiofs")
    launch = plan.plan_launch(config(), FakeBackend(), TemplateStore(tmp_path))
    assert fs_of(launch) == "virtiofs"
    assert launch.store is None and not launch.restores


def test_auto_keeps_9p_where_a_template_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(plan.SHARE_FS_ENV, "auto")
    monkeypatch.setattr(plan, "AUTO_COLD_SHARE_FS", "virtiofs")
    launch = plan.plan_launch(config(), FakeBackend(), TemplateStore(tmp_path))
    assert fs_of(launch) == "9p" and launch.store is not None


def test_auto_cold_boot_follows_the_measured_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(plan.SHARE_FS_ENV, raising=False)
    monkeypatch.setattr(plan, "AUTO_COLD_SHARE_FS", "virtiofs")
    assert fs_of(plan.plan_launch(config(), FakeBackend(), False)) == "virtiofs"
    # Without a virtiofsd, 9p.
    assert fs_of(plan.plan_launch(config(), FakeBackend(virtiofs=False), False)) == "9p"
    monkeypatch.setattr(plan, "AUTO_COLD_SHARE_FS", "9p")
    assert fs_of(plan.plan_launch(config(), FakeBackend(), False)) == "9p"


def test_a_bad_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plan.SHARE_FS_ENV, "nfs")
    with pytest.raises(ValueError, match="HARPOON_SHARE_FS='nfs'"):
        plan.plan_launch(config(), FakeBackend(), False)


def test_delete_kills_a_recorded_virtiofsd_and_nothing_else(tmp_path: Path) -> None:
    fake = tmp_path / "virtiofsd"
    fake.symlink_to("/bin/sleep")
    helper = subprocess.Popen([str(fake), "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "virtiofsd-rootfs.pid").write_text(f"{helper.pid}\n")
        (tmp_path / "virtiofsd-other.pid").write_text(f"{other.pid}\n")
        leftovers.kill_vmm(str(tmp_path))
        assert helper.wait(timeout=5) == -9
        assert other.poll() is None  # not a virtiofsd: a recycled pid is left alone
    finally:
        for process in (helper, other):
            process.kill()
            process.wait()
    assert os.path.exists(tmp_path / "virtiofsd-rootfs.pid")


def test_the_vmm_finds_virtiofsd_where_install_deps_builds_it() -> None:
    from harpoon.devenv import tools
    from harpoon.vmm import virtiofsd

    assert tools.VIRTIOFSD.binary == virtiofsd.TOOLS_BINARY
    assert tools.VIRTIOFSD.version == virtiofsd.VERSION


def test_install_crate_runs_cargo_install_locked_and_caches_the_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from harpoon.devenv import tools

    calls = tmp_path / "calls"
    cargo = tmp_path / "cargo"
    # A stand-in cargo: records its arguments and "installs" into --root.
    cargo.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'while [ "$1" != --root ]; do shift; done\n'
        'mkdir -p "$2/bin" && printf "#!/bin/sh\\n" > "$2/bin/virtiofsd"\n'
        'chmod 755 "$2/bin/virtiofsd"\n'
    )
    cargo.chmod(0o755)
    monkeypatch.setattr(tools, "TOOLS_CACHE_DIR", tmp_path / "tools")
    monkeypatch.setattr(tools, "cargo_binary", lambda: cargo)
    crate = tools.CrateBuild("virtiofsd", "1.14.0")
    assert crate.missing_binaries() == [tmp_path / "tools/virtiofsd-v1.14.0/virtiofsd"]
    assert tools.install_crate(crate) == 0
    assert crate.missing_binaries() == []
    assert calls.read_text().startswith("install virtiofsd --version 1.14.0 --locked --root ")
    # Cached: a second install runs no cargo.
    assert tools.install_crate(crate) == 0
    assert len(calls.read_text().splitlines()) == 1
