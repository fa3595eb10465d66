"""The installed `containerd-shim-harpoon-v1` binary answers -v, -info and delete as
containerd expects (run as a real subprocess, the way containerd runs it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harpoon.api.containerd.task.v2 import shim_pb2
from harpoon.api.containerd.types import introspection_pb2
from harpoon.devenv.tools import in_ci, installed_shim

SHIM = installed_shim()
# Under CI a missing binary is a failure (the tests then fail on it), not a skip.
pytestmark = pytest.mark.skipif(SHIM is None and not in_ci(), reason="harpoon is not installed")


def shim(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    assert SHIM is not None
    return subprocess.run(
        [SHIM, *args], capture_output=True, stdin=subprocess.DEVNULL, cwd=cwd, timeout=60
    )


def test_version_flag_prints_the_version() -> None:
    result = shim("-v")
    assert result.returncode == 0
    assert b"Version:" in result.stdout and b"io.containerd.harpoon.v1" in result.stdout


def test_info_prints_a_runtime_info_message() -> None:
    result = shim("-info")
    assert result.returncode == 0, result.stderr
    info = introspection_pb2.RuntimeInfo.FromString(result.stdout)
    assert info.name == "io.containerd.harpoon.v1" and info.version.version
    # containerd >= 2.2 leaves these to the shim (the erofs snapshotter's rootfs).
    allowed = info.annotations["containerd.io/runtime-allow-mounts"].split(",")
    assert allowed == ["mkdir/*", "format/*", "erofs"]


def test_delete_of_an_unknown_container_is_quick_and_prints_a_delete_response(
    tmp_path: Path,
) -> None:
    result = shim(
        "-namespace", "harpoon-test", "-address", "/nonexistent/containerd.sock",
        "-id", "never-created", "-bundle", str(tmp_path), "delete", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert response.exit_status == 137 and response.exited_at.seconds > 0


def test_unknown_action_is_an_error() -> None:
    result = shim("-namespace", "n", "-id", "x", "frobnicate")
    assert result.returncode == 2 and b"unknown action" in result.stderr
