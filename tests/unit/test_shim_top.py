"""`harpoon top`'s side on the host (harpoon.shim.top): which task a name is, and ps
-ef's columns from the agent's answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.shim import top


def test_a_task_is_found_by_its_id_or_a_unique_prefix(tmp_path: Path) -> None:
    for name in ("abc123", "abd456"):
        (tmp_path / top.TASK_DIR / "ns" / name).mkdir(parents=True)
    assert top.find_container(tmp_path, "ns", "abc123") == "abc123"
    assert top.find_container(tmp_path, "ns", "abd") == "abd456"
    with pytest.raises(top.TopError, match="several tasks"):
        top.find_container(tmp_path, "ns", "ab")
    with pytest.raises(top.TopError, match="no running task 'zz' in namespace 'ns'"):
        top.find_container(tmp_path, "ns", "zz")


def test_a_task_without_an_address_says_so(tmp_path: Path) -> None:
    (tmp_path / top.TASK_DIR / "ns" / "c1").mkdir(parents=True)
    with pytest.raises(top.TopError, match="has no shim address"):
        top.shim_socket(tmp_path, "ns", "c1")
    bundle = tmp_path / top.TASK_DIR / "ns" / "c1"
    (bundle / "address").write_text("unix:///run/x.sock\n")
    assert top.shim_socket(tmp_path, "ns", "c1") == "/run/x.sock"
    (bundle / "bootstrap.json").write_text(
        '{"version":3,"address":"unix:///run/y.sock","protocol":"ttrpc"}'
    )
    assert top.shim_socket(tmp_path, "ns", "c1") == "/run/y.sock", "containerd 2.x's record"


@pytest.mark.parametrize(("tty_nr", "name"), [
    (0, "?"), (136 << 8 | 3, "pts/3"), (137 << 8 | 1, "pts/257"), (4 << 8 | 1, "tty1"),
    (5 << 8 | 1, "?"),
])  # fmt: skip
def test_tty_names(tty_nr: int, name: str) -> None:
    assert top.tty_name(tty_nr) == name


def test_cpu_time_counts_days_apart() -> None:
    assert top.cpu_time(0) == "00:00:00"
    assert top.cpu_time(3725) == "01:02:05"
    assert top.cpu_time(2 * 86400 + 61) == "2-00:01:01"


def test_rows_and_table_in_ps_ef_columns() -> None:
    response = agent_pb2.ListProcessesResponse(
        uptime_ticks=100_000, ticks_per_second=100,
        processes=[
            agent_pb2.GuestProcess(pid=1, ppid=0, uid=0, user="root", start_ticks=90_000,
                                   cpu_ticks=2_000, args=["sleep", "1000"], comm="sleep"),
            agent_pb2.GuestProcess(pid=12, ppid=1, uid=33, start_ticks=99_900, cpu_ticks=0,
                                   tty_nr=136 << 8, comm="kworker"),
        ],
    )  # fmt: skip
    now = time.mktime((2026, 12, 6, 12, 0, 0, 0, 0, -1))
    lines = top.rows(response, now)
    assert lines == [
        ("root", "1", "0", "20", "11:58", "?", "00:00:20", "sleep 1000"),
        ("33", "12", "1", "0", "11:59", "pts/0", "00:00:00", "[kworker]"),
    ]
    assert top.table(lines).splitlines() == [
        "UID   PID  PPID  C   STIME  TTY    TIME      CMD",
        "root  1    0     20  11:58  ?      00:00:20  sleep 1000",
        "33    12   1     0   11:59  pts/0  00:00:00  [kworker]",
    ]


def test_a_start_on_another_day_shows_its_month_and_day() -> None:
    now = time.mktime((2026, 12, 6, 0, 30, 0, 0, 0, -1))
    assert top.start_time(now - 3600, now) == "Dec05"
