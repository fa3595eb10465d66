"""The agent's process listing (harpoon.agent.ps): /proc's formats parsed, and this
test's own process read as the agent reads a container's."""

from __future__ import annotations

import os
from pathlib import Path

from harpoon.agent import ps


def test_stat_fields_are_counted_from_the_last_parenthesis() -> None:
    # comm with a space and a ')' in it, as a process may name itself.
    line = "42 (we ird) x) S 7 42 42 34816 42 4194560 0 0 0 0 25 5 0 0 20 0 1 0 1234 0 0"
    stat = ps.parse_stat(line)
    fields = (stat.comm, stat.ppid, stat.tty_nr, stat.cpu_ticks, stat.start_ticks)
    assert fields == ("we ird) x", 7, 34816, 30, 1234)


def test_status_gives_the_innermost_pid_and_the_real_uid() -> None:
    text = "Name:\tsleep\nUid:\t1000\t0\t0\t0\nNSpid:\t311\t7\n"
    assert ps.parse_status(text) == ([311, 7], 1000)


def test_passwd_maps_the_first_name_of_each_uid() -> None:
    text = "root:x:0:0::/root:/bin/sh\ntoor:x:0:0::/:/bin/sh\nbad line\nwww-data:x:33:33::/:\n"
    assert ps.parse_passwd(text) == {0: "root", 33: "www-data"}


def test_a_live_process_is_listed_with_its_command_line_and_user() -> None:
    me = os.getpid()
    [listed] = ps.processes([me, me])
    assert listed.pid == me  # the host's pid namespace is this process's innermost
    assert listed.ppid == 0, "its parent is not among the processes asked for"
    assert listed.uid == os.getuid()
    assert list(listed.args) == Path(f"/proc/{me}/cmdline").read_text().split("\0")[:-1]
    assert listed.start_ticks > 0


def test_a_child_names_its_parent_and_a_gone_pid_is_left_out() -> None:
    child = os.fork()
    if child == 0:
        os.execv("/bin/sleep", ["sleep", "5"])
    try:
        listed = ps.processes([os.getpid(), child, 2**22 + 1])
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    assert [p.pid for p in listed] == sorted([os.getpid(), child])
    by_pid = {p.pid: p for p in listed}
    assert by_pid[child].ppid == os.getpid()
