"""The agent's crun: `crun start` without crun (the exec.fifo handshake against a fake state
dir), and the sealed copy of crun it runs.

crun 1.8.1's create leaves <root>/<id>/status (the init's pid and start time) and
<root>/<id>/exec.fifo, which the init holds open for reading until start writes a byte.
Here this test process stands in for the init: it holds the fifo's read end.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.agent import oci
from harpoon.agent.container import Container
from harpoon.agent.processes import Process, ProcessSpec, ProcessTable
from harpoon.ttrpc.status import TtrpcError

ID = "c1"


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rpartition(b")")[2].split()[19])


class FakeState:
    """What `crun create` leaves in its state dir for a container whose init waits."""

    def __init__(self, root: Path, pid: int, process_start_time: int | None) -> None:
        self.dir = root / ID
        self.dir.mkdir()
        self.fifo = self.dir / "exec.fifo"
        os.mkfifo(self.fifo, 0o600)
        self.reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        status = {"pid": pid, "cgroup-path": "", "rootfs": "/r", "bundle": "/b", "created": "x"}
        if process_start_time is not None:
            status["process-start-time"] = process_start_time
        # As crun writes it: json_gen_beautify.
        (self.dir / "status").write_text(json.dumps(status, indent=4))

    def read_byte(self) -> bytes:
        """The byte written, or b"" (none: end of file or EAGAIN, no writer or no byte)."""
        try:
            return os.read(self.reader, 1)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.reader)


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(oci, "STATE_ROOT", str(tmp_path))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    return tmp_path


@pytest.fixture
def created(state_root: Path) -> Iterator[FakeState]:
    state = FakeState(state_root, os.getpid(), start_time(os.getpid()))
    yield state
    state.close()


def test_start_writes_one_byte_to_the_fifo_and_removes_it(created: FakeState) -> None:
    assert oci._start_created(ID) is True
    assert not created.fifo.exists()
    assert created.read_byte() == b"\0"


def test_a_status_without_start_time_checks_only_the_pid(state_root: Path) -> None:
    state = FakeState(state_root, os.getpid(), None)
    try:
        assert oci._start_created(ID) is True
        assert state.read_byte() == b"\0"
    finally:
        state.close()


def refused(state: FakeState) -> None:
    """Nothing done: `crun start` is left to run (and refuse in its own words)."""
    assert oci._start_created(ID) is False
    assert state.fifo.exists()
    assert state.read_byte() == b""


def test_an_exited_init_is_left_to_crun(state_root: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    state = FakeState(state_root, child.pid, 1)
    try:
        refused(state)
    finally:
        state.close()


def test_another_process_with_the_init_pid_is_left_to_crun(state_root: Path) -> None:
    state = FakeState(state_root, os.getpid(), start_time(os.getpid()) + 1)
    try:
        refused(state)
    finally:
        state.close()


def test_a_zombie_init_is_left_to_crun(state_root: Path) -> None:
    child = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        state = FakeState(state_root, child.pid, start_time(child.pid))
        try:
            refused(state)
        finally:
            state.close()
    finally:
        child.wait()


def test_a_fifo_without_reader_is_left_to_crun(created: FakeState) -> None:
    os.close(created.reader)
    created.reader = os.open("/dev/null", os.O_RDONLY)
    assert oci._start_created(ID) is False
    assert created.fifo.exists()


def test_a_started_container_is_left_to_crun(created: FakeState) -> None:
    assert oci._start_created(ID) is True
    assert oci._start_created(ID) is False  # no fifo: crun says why


def test_a_fifo_that_is_not_a_fifo_is_left_to_crun(created: FakeState) -> None:
    created.fifo.unlink()
    created.fifo.write_bytes(b"")
    assert oci._start_created(ID) is False
    assert created.fifo.read_bytes() == b""


@pytest.mark.parametrize("status", ["", "{", "[]", '{"pid": "1"}', '{"cgroup-path": ""}'])
def test_an_unexpected_status_file_is_left_to_crun(created: FakeState, status: str) -> None:
    (created.dir / "status").write_text(status)
    refused(created)


def test_a_missing_state_dir_is_left_to_crun(state_root: Path) -> None:
    assert oci._start_created("other") is False


def test_a_notify_socket_is_left_to_crun(
    created: FakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/notify")
    refused(created)


class RecordingRuntime(oci.OciRuntime):
    def __init__(self) -> None:
        super().__init__(ProcessTable())
        self.commands: list[list[str]] = []

    async def _crun(self, container_id: str, command: list[str], stdio: object = None) -> None:  # type: ignore[override]
        self.commands.append(command)


def container(table: ProcessTable, spec: dict[str, object]) -> Process:
    config = {"root": {"path": "/r"}, "process": {"args": ["x"]}, **spec}
    process = table.create(ID, ProcessSpec(Container.from_config(config)))
    process.pid = 42
    return process


def test_runtime_start_runs_crun_only_when_the_fifo_is_not_what_it_expects(
    created: FakeState,
) -> None:
    async def scenario() -> list[list[str]]:
        runtime = RecordingRuntime()
        process = container(runtime.table, {})
        assert await runtime.start(process) == 42
        assert process.started
        assert runtime.commands == []
        again = RecordingRuntime()
        assert await again.start(container(again.table, {})) == 42
        return again.commands

    assert asyncio.run(scenario()) == [["start", ID]]


def test_poststart_hooks_are_left_to_crun(created: FakeState) -> None:
    async def scenario() -> list[list[str]]:
        runtime = RecordingRuntime()
        hooks = {"hooks": {"poststart": [{"path": "/bin/true"}]}}
        assert await runtime.start(container(runtime.table, hooks)) == 42
        return runtime.commands

    assert asyncio.run(scenario()) == [["start", ID]]
    assert created.fifo.exists()
    assert created.read_byte() == b""


def test_a_failed_write_after_the_unlink_is_an_error(
    created: FakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_write(fd: int, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(oci.os, "write", broken_write)
    with pytest.raises(TtrpcError, match=r"crun start failed: exec\.fifo: .*Broken pipe"):
        oci._start_created(ID)


def test_crun_runs_without_aslr() -> None:
    # The container's processes get the spec's personality back (the host's guest spec
    # names it: tests/unit/test_shim_transform.py).
    assert oci.ADDR_NO_RANDOMIZE == 0x0040000


def test_sealed_copy_holds_the_file_sealed_as_crun_accepts_it(tmp_path: Path) -> None:
    binary = tmp_path / "crun"
    binary.write_bytes(b"\x7fELF" + bytes(range(256)) * 5000)
    fd = oci.sealed_copy(str(binary))
    assert fd is not None
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == oci.CRUN_MEMFD_SEALS == 15
        assert Path(f"/proc/self/fd/{fd}").read_bytes() == binary.read_bytes()
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:harpoon-crun")
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_no_sealed_copy_without_the_file(tmp_path: Path) -> None:
    assert oci.sealed_copy(str(tmp_path / "missing")) is None
