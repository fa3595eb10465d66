"""The agent's process table as crun uses it: helpers, adopted pids and early exits.

crun exits at once and leaves the container's process to the agent (PID 1 in the VM).
Here a child subreaper stands in for PID 1: each scenario runs in a fresh Python
process that makes itself one, so orphans come to it as they would to the agent.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PRELUDE = textwrap.dedent(
    """
    import asyncio, ctypes, os, signal, sys
    from harpoon.agent.container import Container
    from harpoon.agent.processes import ProcessSpec, ProcessTable

    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0

    def reaping_table():
        # The agent's wiring: the table reaps on SIGCHLD.
        table = ProcessTable()
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, table.reap)
        return table

    def oci(**extra):
        container = Container.from_config({"root": {"path": "/r"}, "process": {"args": ["x"]}})
        return ProcessSpec(container, **extra)

    # What crun does: start the container's process, write its pid, exit without waiting
    # for it. (A shell's `cmd &` will not do: the shell may reap its background job.)
    CRUN_STAND_IN = (
        "import os, sys\\n"
        "pid = os.fork()\\n"
        "if pid == 0:\\n"
        "    os.execv('/bin/sh', ['sh', '-c', sys.argv[1]])\\n"
        "with open(sys.argv[2], 'w') as f:\\n"
        "    f.write(str(pid))\\n"
    )

    async def reaped(pid, timeout_s=10):
        # Reaped, not just exited: a zombie keeps its /proc entry. Nothing signals it
        # to the test (the table's SIGCHLD handler does the reaping): looked at again.
        deadline = asyncio.get_running_loop().time() + timeout_s
        while os.path.exists(f"/proc/{pid}"):
            assert asyncio.get_running_loop().time() < deadline, f"{pid} not reaped"
            await asyncio.sleep(0.005)

    async def detached(table, command, pid_file):
        since = table.generation
        argv = [sys.executable, "-c", CRUN_STAND_IN, command, pid_file]
        status = await table.run_helper(argv, (None, None, None))
        assert status == 0, status
        return int(open(pid_file).read()), since
    """
)


def run(scenario: str) -> str:
    code = PRELUDE + textwrap.dedent(scenario)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_helper_exit_status_comes_from_the_reaper() -> None:
    out = run(
        """
        async def main():
            table = reaping_table()
            print(await table.run_helper(["/bin/sh", "-c", "exit 7"], (None, None, None)))
            print(await table.run_helper(["/nonexistent"], (None, None, None)))
        asyncio.run(main())
        """
    )
    assert out.split() == ["7", "127"]


def test_adopted_process_exit_is_reported_even_if_it_exited_before_adoption(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    out = run(
        f"""
        async def main():
            table = reaping_table()
            # Exits at once: its exit is reaped before the pid file is read.
            pid, since = await detached(table, "exit 3", "{pid_file}")
            await reaped(pid)
            fast = table.create("fast", oci())
            table.adopt(fast, pid, since)
            await asyncio.wait_for(fast.exited.wait(), 5)
            print("fast", fast.exit_status)
            # Still running when adopted: reported when it ends, by a signal here.
            pid, since = await detached(table, "exec sleep 30", "{pid_file}")
            slow = table.create("slow", oci())
            table.adopt(slow, pid, since)
            assert not slow.exited.is_set()
            os.kill(pid, signal.SIGTERM)
            await asyncio.wait_for(slow.exited.wait(), 5)
            print("slow", slow.exit_status)
        asyncio.run(main())
        """
    )
    assert out.split() == ["fast", "3", "slow", str(128 + 15)]


def test_a_stale_exit_of_a_reused_pid_is_not_taken_for_a_new_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    out = run(
        f"""
        async def main():
            table = reaping_table()
            pid, _ = await detached(table, "exit 5", "{pid_file}")
            await reaped(pid)
            # The same pid adopted with a generation taken after that exit was reaped:
            # the recorded exit belongs to an earlier process, not to this one.
            later = table.create("later", oci())
            table.adopt(later, pid, table.generation)
            await asyncio.sleep(0.2)  # a window for a wrong exit to be reported
            print("exited" if later.exited.is_set() else "running")
        asyncio.run(main())
        """
    )
    assert out.split() == ["running"]


def test_terminal_output_waits_for_the_terminal_crun_sends() -> None:
    out = run(
        """
        from harpoon.agent import processes
        async def main():
            table = ProcessTable()
            p = table.create("t", oci(terminal=True, stdin=True, stdout=True))
            reading = asyncio.ensure_future(processes.read_output(p, "stdout"))
            processes.resize_terminal(p, 100, 40)
            processes.close_input(p)  # before the terminal exists: applied later
            await asyncio.sleep(0.1)  # a window for the read to end too early
            assert not reading.done()
            master, slave = os.openpty()
            table.attach_terminal(p, master)
            os.write(slave, b"hello")
            print((await asyncio.wait_for(reading, 5)).decode())
            import fcntl, struct, termios
            rows, cols = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, bytes(8)))[:2]
            print(cols, rows, p.stdin_fd is None)
        asyncio.run(main())
        """
    )
    assert out.split() == ["hello", "100", "40", "True"]


def test_helper_runs_with_the_personality_asked_for(tmp_path: Path) -> None:
    out_file = tmp_path / "personality"
    out = run(
        f"""
        async def main():
            table = reaping_table()
            script = "cat /proc/self/personality > {out_file}"
            for personality in (None, 0x0040000):
                argv = ["/bin/sh", "-c", script]
                status = await table.run_helper(argv, (None, None, None), personality)
                print(status, open("{out_file}").read().strip())
        asyncio.run(main())
        """
    )
    assert out.split() == ["0", "00000000", "0", "00040000"]


def test_an_exit_of_an_earlier_holder_of_the_pid_reaped_during_create_is_not_taken(
    tmp_path: Path,
) -> None:
    """An orphan (the warm-up's init) exits and is reaped while a container is created,
    and the container's init gets its pid: that exit is not the init's (it happened under
    load, and the agent killed the new container)."""
    pid_file = tmp_path / "pid"
    out = run(
        f"""
        async def main():
            table = reaping_table()
            since = table.generation
            pid, _ = await detached(table, "exec sleep 30", "{pid_file}")
            # The earlier holder's exit, as the reaper records it, after `since`.
            table._unclaimed[pid] = (0, table.generation + 1)
            init = table.create("init", oci())
            table.adopt(init, pid, since)
            print("exited" if init.exited.is_set() else "running")
            os.kill(pid, signal.SIGTERM)
            await asyncio.wait_for(init.exited.wait(), 5)
            print(init.exit_status)
        asyncio.run(main())
        """
    )
    assert out.split() == ["running", str(128 + 15)]
