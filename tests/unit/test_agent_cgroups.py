"""The container's cgroup metrics as the agent reads them (harpoon.agent.cgroups), from
a fake cgroup directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from harpoon.agent import cgroups
from harpoon.api.containerd.cgroups.v2 import metrics_pb2


@pytest.fixture
def group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cgroups, "CONTAINER_GROUP", str(tmp_path))
    (tmp_path / "pids.current").write_text("3\n")
    (tmp_path / "memory.current").write_text("4096\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    return tmp_path


def test_metrics_without_io_stat_still_carry_an_io_message(group: Path) -> None:
    """nerdctl stats dereferences Metrics.io: a Go client gets nil for an unset one."""
    (group / "io.stat").write_text("")
    metrics = cgroups.read_metrics()
    assert metrics.HasField("io") and list(metrics.io.usage) == []
    decoded = metrics_pb2.Metrics.FromString(metrics.SerializeToString())
    assert decoded.HasField("io")
    assert (decoded.pids.current, decoded.memory.usage, decoded.cpu.usage_usec) == (3, 4096, 10)


def test_metrics_of_a_group_without_io_stat_file_carry_an_io_message(group: Path) -> None:
    assert cgroups.read_metrics().HasField("io")


def test_io_stat_lines_become_io_entries(group: Path) -> None:
    (group / "io.stat").write_text("254:0 rbytes=512 wbytes=1024 rios=1 wios=2 dbytes=0 dios=0\n")
    (entry,) = cgroups.read_metrics().io.usage
    assert (entry.major, entry.minor, entry.rbytes, entry.wbytes, entry.rios, entry.wios) == (
        254, 0, 512, 1024, 1, 2,
    )  # fmt: skip


def test_a_group_without_a_memory_limit_reports_the_vms_memory(
    group: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:         251236 kB\nMemFree:  1 kB\n")
    monkeypatch.setattr(cgroups, "MEMINFO", str(meminfo))
    (group / "memory.max").write_text("max\n")
    assert cgroups.read_metrics().memory.usage_limit == 251236 * 1024
    (group / "memory.max").write_text("50331648\n")
    assert cgroups.read_metrics().memory.usage_limit == 48 << 20
