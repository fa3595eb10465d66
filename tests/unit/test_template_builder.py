"""The detached template builder (harpoon.sandbox.template_builder) without a guest:
its configuration round trip, the lock probe the shim makes before starting one, and
the process itself (its own session, its log in the store, a clear refusal)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harpoon.sandbox import template_builder
from harpoon.sandbox.template import TemplateStore
from harpoon.sandbox.template_builder import BUILD_LOG_NAME, config_from_json, config_to_json
from harpoon.vmm.base import VMConfig
from harpoon.vmm.devices import NIC, Disk, Share, StreamBackend, TapBackend, Vsock


def config(tmp_path: Path, **overrides: object) -> VMConfig:
    values: dict[str, object] = dict(
        name="c1", arch="amd64", kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd",
        state_dir=tmp_path / "vm", cpus=2, memory_mib=512,
        shares=(Share("rootfs", tmp_path / "share", read_only=True),),
        disks=(Disk("layer0", tmp_path / "l.erofs"), Disk("rw", tmp_path / "rw", read_only=False)),
        nics=(NIC("eth0", "02:00:00:00:00:01", TapBackend("tap0")),
              NIC("eth1", "02:00:00:00:00:02", StreamBackend(tmp_path / "gv.sock"))),
        vsock=Vsock(7),
        kernel_args=("quiet",), machine="q35", low_priority=True,
    )  # fmt: skip
    values.update(overrides)
    return VMConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("memory_file", [None, "memory"])
def test_a_configuration_survives_the_trip_to_the_builder(
    tmp_path: Path, memory_file: str | None
) -> None:
    original = config(tmp_path, memory_file=None if memory_file is None else tmp_path / memory_file)
    assert config_from_json(config_to_json(original, "qemu")) == (original, "qemu")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "c1"}',
        "[1, 2]",
        '{"backend": "qemu", "config": {"name": 1, "shares": 3}}',
        '{"backend": "qemu", "config": {"name": "c1", "vsock": {"cid": 1}}}',
    ],
)
def test_anything_but_a_configuration_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        config_from_json(text)


def test_the_store_says_when_a_build_holds_its_lock(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    assert not store.building()  # no store yet

    async def while_locked() -> bool:
        async with store._lock():
            return store.building()

    assert asyncio.run(while_locked())
    assert not store.building()


def test_the_builder_runs_in_its_own_session_and_logs_to_the_store(tmp_path: Path) -> None:
    """Here it fails (no kernel, no initrd): it says so in the store's build log and
    exits 1, leaving no staging directory."""
    root = tmp_path / "templates"
    builder = template_builder.spawn(config(tmp_path), "qemu", root)
    session = os.getsid(builder.pid)
    status = asyncio.run(asyncio.wait_for(builder.wait(), 120))
    assert session != os.getsid(0)
    log = (root / BUILD_LOG_NAME).read_text()
    assert status == 1, log
    assert "no VM template for c1" in log
    assert not list(root.glob(".build-*"))


def test_the_builder_refuses_bad_arguments_clearly(tmp_path: Path) -> None:
    module = template_builder.__name__
    result = subprocess.run([sys.executable, "-m", module, str(tmp_path), "{}"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "not a VM configuration" in result.stderr


def test_a_large_build_log_is_started_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "templates"
    root.mkdir()
    (root / BUILD_LOG_NAME).write_text("an old line\n")
    monkeypatch.setattr(template_builder, "MAX_BUILD_LOG_BYTES", 4)
    builder = template_builder.spawn(config(tmp_path), "qemu", root)
    assert asyncio.run(asyncio.wait_for(builder.wait(), 120)) == 1
    assert "an old line" not in (root / BUILD_LOG_NAME).read_text()
