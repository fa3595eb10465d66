"""Exec, stdin and terminals under harpoon, through real containerd and ctr."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from tests.e2e.test_harpoon_run import (
    HARPOON,
    RUN_TIMEOUT_S,
    ctr_command,
    start_sleeper,
    wait_until_running,
)

pytestmark = pytest.mark.vm


@pytest.fixture
def sleeper(containerd: Containerd, busybox_image: str, container_id: str):  # type: ignore[no-untyped-def]
    """A running `sleep 1000` container, killed and removed after the test."""
    start_sleeper(containerd, busybox_image, container_id)
    yield container_id
    containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id, check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if containerd.ctr("task", "delete", container_id, check=False).returncode == 0:
            break
        time.sleep(0.2)
    containerd.ctr("container", "delete", container_id, check=False)


def test_exec_runs_in_the_container_with_its_own_output_and_status(
    containerd: Containerd, sleeper: str
) -> None:
    result = containerd.ctr(
        "task", "exec", "--exec-id", "e1", sleeper, "sh", "-c", "echo out; echo err >&2; exit 5",
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 5
    assert result.stdout == "out\n"
    assert "err\n" in result.stderr


def test_exec_sees_the_containers_filesystem(containerd: Containerd, sleeper: str) -> None:
    result = containerd.ctr(
        "task", "exec", "--exec-id", "e2", sleeper, "sh", "-c",
        "echo marker > /tmp/m; cat /tmp/m; ls /bin/busybox",
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "marker\n/bin/busybox\n")


def test_duplicate_exec_id_is_already_exists(containerd: Containerd, sleeper: str) -> None:
    first = subprocess.Popen(
        ctr_command(containerd, "task", "exec", "--exec-id", "dup", sleeper, "sleep", "100"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "dup" not in containerd.ctr("task", "ps", sleeper, check=False).stdout:
            assert time.monotonic() < deadline, "the first exec never showed in `ctr task ps`"
            time.sleep(0.2)
        second = containerd.ctr(
            "task", "exec", "--exec-id", "dup", sleeper, "true", timeout=RUN_TIMEOUT_S, check=False
        )
        assert second.returncode != 0
        assert "already exists" in second.stderr
    finally:
        containerd.ctr("task", "kill", "--signal", "SIGKILL", sleeper, check=False)
        first.wait(RUN_TIMEOUT_S)


def test_exec_in_a_stopped_container_fails(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    containerd.ctr(
        "run", "-d", "--runtime", HARPOON, busybox_image, container_id, "true",
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "STOPPED" not in containerd.ctr("task", "ls").stdout:
            assert time.monotonic() < deadline, "the container never stopped"
            time.sleep(0.2)
        result = containerd.ctr(
            "task", "exec", "--exec-id", "late", container_id, "true", check=False
        )
        assert result.returncode != 0 and "not running" in result.stderr
    finally:
        containerd.ctr("task", "delete", container_id, check=False)
        containerd.ctr("container", "delete", container_id, check=False)


def test_piped_stdin_reaches_the_process(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, busybox_image, container_id, "head", "-n", "1",
        input="hello through stdin\nsecond line\n", timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "hello through stdin\n")


def run_in_terminal(argv: list[str], rows: int, cols: int, timeout: float) -> tuple[int, bytes]:
    """Runs argv with a pty of the given size as its terminal; returns (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    process = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout), output


def test_terminal_run_gets_a_tty_of_the_clients_size(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    # ctr sends the size (ResizePty) only after Start, so the process may run before
    # it arrives (under runc too): poll until the terminal has a size.
    script = (
        "tty; for i in $(seq 50); do s=$(stty size 2>/dev/null); "
        'case "$s" in ""|"0 0") sleep 0.1;; *) break;; esac; done; echo "$s"; exit 4'
    )
    status, output = run_in_terminal(
        ctr_command(
            containerd, "run", "-t", "--rm", "--runtime", HARPOON, busybox_image, container_id,
            "sh", "-c", script,
        ),
        rows=37, cols=101, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    text = output.decode(errors="replace")
    assert status == 4, text
    assert "/dev/pts/" in text and "37 101" in text


LOGGER_SCRIPT = """#!/bin/sh
# A binary:// logger as containerd defines them: fd 3 stdout, fd 4 stderr, fd 5 ready.
[ "$1" = file ] || exit 2
cat <&3 > "$2.out" &
cat <&4 > "$2.err" &
printf x >&5
exec 5>&-
echo "$CONTAINER_NAMESPACE/$CONTAINER_ID" > "$2.env"
wait
"""


def test_binary_logger_receives_stdout_and_stderr(
    containerd: Containerd, busybox_image: str, container_id: str, tmp_path: Path
) -> None:
    logger = tmp_path / "logger.sh"
    logger.write_text(LOGGER_SCRIPT)
    logger.chmod(0o755)
    base = tmp_path / "log"
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, "--log-uri", f"binary://{logger}?file={base}",
        busybox_image, container_id, "sh", "-c", "echo to-out; echo to-err >&2; exit 6",
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 6, result.stderr
    deadline = time.monotonic() + 20
    wanted = {".out": "to-out\n", ".err": "to-err\n"}
    while time.monotonic() < deadline:
        got = {s: Path(f"{base}{s}").read_text() for s in wanted if Path(f"{base}{s}").exists()}
        if got == wanted:
            break
        time.sleep(0.2)
    assert got == wanted
    assert Path(f"{base}.env").read_text() == f"{containerd.namespace}/{container_id}\n"


def test_metrics_come_from_the_containers_cgroup_in_the_guest(
    containerd: Containerd, sleeper: str
) -> None:
    from harpoon.api.containerd.cgroups.v2 import metrics_pb2

    del metrics_pb2  # ctr decodes the Any itself: the text shows what it understood
    result = containerd.ctr("task", "metrics", sleeper, check=False)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if " " in line)
    assert int(lines["pids.current"].strip()) >= 1
    assert int(lines["memory.usage"].strip()) > 0


def test_pause_freezes_the_vm_and_resume_continues_it(containerd: Containerd, sleeper: str) -> None:
    containerd.ctr("task", "pause", sleeper)
    [line] = [ln for ln in containerd.ctr("task", "ls").stdout.splitlines() if sleeper in ln]
    assert line.split()[-1] == "PAUSED"
    kill = containerd.ctr("task", "kill", sleeper, check=False)
    assert kill.returncode != 0 and "paused" in kill.stderr
    containerd.ctr("task", "resume", sleeper)
    wait_until_running(containerd, sleeper)
    result = containerd.ctr(
        "task", "exec", "--exec-id", "after", sleeper, "echo", "awake", timeout=RUN_TIMEOUT_S
    )
    assert result.stdout == "awake\n"


def test_update_sets_the_guest_cgroup_limits_and_refuses_to_outgrow_the_vm(
    containerd: Containerd, sleeper: str
) -> None:
    """Neither ctr 1.6 nor 2.3 has `task update`: talk to the shim's socket directly,
    as containerd does for CRI's and docker's updates."""
    import asyncio
    import json

    from google.protobuf import any_pb2

    from harpoon.api.containerd.cgroups.v2 import metrics_pb2
    from harpoon.api.containerd.task.v2 import shim_pb2
    from harpoon.shim import paths
    from harpoon.ttrpc.client import Client
    from harpoon.ttrpc.status import Code, TtrpcError

    socket = paths.socket_path(containerd.address, containerd.namespace, sleeper)
    task_service = "containerd.task.v2.Task"
    metadata = {"containerd-namespace-ttrpc": containerd.namespace}

    def update(memory_limit: int) -> shim_pb2.UpdateTaskRequest:
        resources = json.dumps({"memory": {"limit": memory_limit}}).encode()
        return shim_pb2.UpdateTaskRequest(
            id=sleeper,
            resources=any_pb2.Any(
                type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                value=resources,
            ),
        )

    async def scenario() -> tuple[int, TtrpcError]:
        client = await Client.connect_unix(str(socket))
        try:
            call = client.call
            await call(task_service, "Update", update(48 << 20).SerializeToString(),
                       timeout=30, metadata=metadata)  # fmt: skip
            stats = shim_pb2.StatsResponse.FromString(
                await call(
                    task_service,
                    "Stats",
                    shim_pb2.StatsRequest(id=sleeper).SerializeToString(),
                    timeout=30,
                    metadata=metadata,
                )
            )
            metrics = metrics_pb2.Metrics.FromString(stats.stats.value)
            try:
                await call(task_service, "Update", update(8 << 30).SerializeToString(),
                           timeout=30, metadata=metadata)  # fmt: skip
            except TtrpcError as error:
                return metrics.memory.usage_limit, error
            raise AssertionError("an 8 GiB limit on a small VM was accepted")
        finally:
            await client.close()

    limit, refused = asyncio.run(scenario())
    assert limit == 48 << 20
    assert refused.code == Code.FAILED_PRECONDITION and "fixed" in refused.message


def test_a_client_that_stops_reading_output_cannot_block_kill_and_delete(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    """Output flows through its own channel: a full stdout FIFO stalls only it."""
    client = subprocess.Popen(
        ctr_command(containerd, "run", "--rm", "--runtime", HARPOON, busybox_image,
                    container_id, "yes", "flood"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_running(containerd, container_id)
        time.sleep(2)  # the FIFO and every buffer behind it fill up
        client.kill()  # nobody reads stdout any more
        client.wait(30)
        started = time.monotonic()
        containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id, timeout=30)
        deadline = time.monotonic() + 30
        while containerd.ctr("task", "delete", container_id, check=False).returncode != 0:
            assert time.monotonic() < deadline, "the task could not be deleted"
            time.sleep(0.2)
        assert time.monotonic() - started < 30
    finally:
        if client.poll() is None:
            client.kill()
        containerd.ctr("container", "delete", container_id, check=False)
