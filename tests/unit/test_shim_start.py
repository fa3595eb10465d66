"""`containerd-shim-harpoon-v1 start` as containerd runs it: it answers at once, lets go
of containerd's pipes, and leaves a forked daemon serving the task socket (here without
a guest image, so no VM is started ahead)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from harpoon.api.containerd.task.v2 import shim_pb2
from harpoon.devenv.tools import in_ci, installed_shim
from harpoon.ttrpc.client import Client
from harpoon.ttrpc.service import ServiceClient

SHIM = installed_shim()
# Under CI a missing binary is a failure (the tests then fail on it), not a skip.
pytestmark = pytest.mark.skipif(SHIM is None and not in_ci(), reason="harpoon is not installed")


def test_start_answers_and_leaves_a_forked_daemon_serving(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    # Short: a socket path longer than 106 bytes would move to /run/containerd/s.
    sockets = Path(tempfile.mkdtemp(prefix="hp-s-", dir="/tmp"))
    try:
        _start_serve_and_shut_down(tmp_path, bundle, sockets)
    finally:
        # A failure before Shutdown must not leave the forked daemon running.
        _kill_processes_with_env(f"HARPOON_RUN_DIR={tmp_path / 'run'}")
        shutil.rmtree(sockets, ignore_errors=True)


def _kill_processes_with_env(entry: str) -> None:
    wanted = entry.encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environment:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _start_serve_and_shut_down(tmp_path: Path, bundle: Path, sockets: Path) -> None:
    params = bootstrap_pb2.BootstrapParams(
        instance_id="c1", namespace="harpoon-test", socket_dir=str(sockets)
    )
    env = dict(os.environ, HARPOON_GUEST_DIR=str(tmp_path / "no-guest"),
               HARPOON_RUN_DIR=str(tmp_path / "run"))  # fmt: skip
    env.pop("TTRPC_ADDRESS", None)
    assert SHIM is not None
    began = time.monotonic()
    # capture_output waits for EOF on both pipes: the daemon must have let go of them.
    result = subprocess.run(
        [SHIM, "-namespace", "harpoon-test", "-address", "/nonexistent/containerd.sock",
         "-id", "c1", "start"],
        input=params.SerializeToString(), capture_output=True, cwd=bundle, env=env, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 10
    answer = bootstrap_pb2.BootstrapResult.FromString(result.stdout)
    assert answer.protocol == "ttrpc" and answer.address.startswith(f"unix://{sockets}/")
    socket_path = answer.address.removeprefix("unix://")
    assert (bundle / "address").read_text() == answer.address

    async def talk() -> int:
        client = await Client.connect_unix(socket_path)
        try:
            task = ServiceClient(client, "containerd.task.v2.Task")
            connected = await task.call(
                "Connect", shim_pb2.ConnectRequest(id="c1"), shim_pb2.ConnectResponse, timeout=30
            )
            await task.call(
                "Shutdown", shim_pb2.ShutdownRequest(id="c1"), empty_pb2.Empty, timeout=30
            )
            return connected.shim_pid
        finally:
            await client.close()

    shim_pid = asyncio.run(talk())
    assert shim_pid > 0
    _wait_for_exit(shim_pid, timeout_s=10)
    assert not os.path.exists(socket_path)  # the daemon removed it as it exited
    assert not Path(f"/proc/{shim_pid}").exists() or "Z" in _state(shim_pid)


def _wait_for_exit(pid: int, timeout_s: float) -> None:
    """Returns once pid (not a child of ours) has exited: its pidfd becomes readable."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # exited and reaped already
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
        assert ready, f"the shim daemon {pid} still runs {timeout_s} s after Shutdown"
    finally:
        os.close(pidfd)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_start_refuses_a_backend_choice_it_cannot_follow_and_forks_nothing(
    tmp_path: Path,
) -> None:
    """A bad $HARPOON_VMM is said on start's stderr, which containerd shows the user, and
    no daemon is left behind (it would die on the same choice, in a log nobody reads)."""
    assert SHIM is not None
    sockets = Path(tempfile.mkdtemp(prefix="hp-s-", dir="/tmp"))
    env = {**os.environ, "HARPOON_VMM": "firecracker", "HARPOON_RUN_DIR": str(tmp_path / "run")}
    try:
        done = subprocess.run(
            [
                str(SHIM),
                "-namespace",
                "ns",
                "-id",
                "bad-vmm",
                "-address",
                f"{sockets}/c.sock",
                "start",
            ],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        _kill_processes_with_env(f"HARPOON_RUN_DIR={tmp_path / 'run'}")
        shutil.rmtree(sockets, ignore_errors=True)
    assert done.returncode == 1, done
    assert "HARPOON_VMM='firecracker' names no VMM backend" in done.stderr
    assert "qemu" in done.stderr and "vfkit" in done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "address").exists()
