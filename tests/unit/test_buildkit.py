"""harpoon.buildkit: buildkitd's configuration as buildkitd reads it (TOML), and its
start, readiness, stop and clean-up, against a stand-in buildkitd and buildctl (small
Python scripts: a socket, a pid, a worker list) so that no Go binary is needed."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon import linux
from harpoon.buildkit.config import (
    HARPOON_RUNTIME,
    BuildkitdLayout,
    BuildkitdSettings,
    CniBridge,
    render_buildkitd_config,
    render_cni_config,
)
from harpoon.buildkit.daemon import (
    BuildkitBinaries,
    BuildkitdError,
    running_pid,
    start_buildkitd,
    stop_buildkitd,
)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[BuildkitdLayout]:
    """A layout in tmp_path; whatever a test left running on it is stopped after it."""
    layout = BuildkitdLayout(root=tmp_path / "root", run_dir=tmp_path / "run")
    yield layout
    stop_buildkitd(layout, timeout_s=0.5)


def rendered(settings: BuildkitdSettings, layout: BuildkitdLayout) -> dict:  # type: ignore[type-arg]
    return tomllib.loads(render_buildkitd_config(settings, layout))


def test_the_containerd_worker_alone_runs_steps_with_harpoon(layout: BuildkitdLayout) -> None:
    config = rendered(BuildkitdSettings(Path("/tmp/hp-x/containerd.sock")), layout)
    assert config["worker"]["oci"] == {"enabled": False}
    worker = config["worker"]["containerd"]
    assert worker["enabled"] is True
    assert worker["address"] == "/tmp/hp-x/containerd.sock"
    assert worker["namespace"] == "default"
    assert worker["runtime"] == {"name": HARPOON_RUNTIME}
    assert worker["networkMode"] == "host"
    assert worker["gc"] is False
    assert "cniConfigPath" not in worker


def test_every_file_and_socket_is_the_layouts_own(layout: BuildkitdLayout) -> None:
    config = rendered(BuildkitdSettings(Path("/c.sock")), layout)
    assert config["root"] == str(layout.root)
    assert config["grpc"]["address"] == [f"unix://{layout.run_dir}/buildkitd.sock"]
    # The default otel socket is machine-wide; CDI would read /etc/cdi.
    assert config["otel"]["socketPath"] == str(layout.run_dir / "otel-grpc.sock")
    assert config["cdi"]["disabled"] is True


def test_cni_mode_is_a_bridge_of_its_own_and_gc_is_bounded(layout: BuildkitdLayout) -> None:
    bridge = CniBridge("hpbk0", "10.231.7.0/24")
    settings = BuildkitdSettings(
        Path("/c.sock"),
        namespace="builds",
        network="cni",
        cni=bridge,
        cni_plugin_dir=Path("/opt/cni"),
        gc_max_used_bytes=2 << 30,
    )
    worker = rendered(settings, layout)["worker"]["containerd"]
    assert (worker["networkMode"], worker["namespace"]) == ("cni", "builds")
    assert worker["cniConfigPath"] == str(layout.cni_config)
    assert layout.cni_config.name.endswith(".conflist")  # buildkitd reads a list so
    assert worker["cniBinaryPath"] == "/opt/cni"
    assert worker["cniPoolSize"] == 0  # no namespaces (and veths) made ahead
    assert (worker["gc"], worker["maxUsedSpace"]) == (True, 2 << 30)
    (plugin,) = json.loads(render_cni_config(bridge, layout))["plugins"]
    assert (plugin["type"], plugin["bridge"], plugin["ipMasq"]) == ("bridge", "hpbk0", False)
    # Its leases are the layout's, not the machine-wide /var/lib/cni/networks.
    assert plugin["ipam"]["dataDir"] == str(layout.cni_ipam)
    assert plugin["ipam"]["ranges"] == [[{"subnet": "10.231.7.0/24"}]]


def test_settings_that_buildkitd_could_not_run_are_refused() -> None:
    with pytest.raises(ValueError, match="CniBridge"):
        BuildkitdSettings(Path("/c.sock"), network="cni")
    with pytest.raises(ValueError, match="CniBridge"):
        BuildkitdSettings(Path("/c.sock"), cni=CniBridge("hpbk0", "10.231.7.0/24"))
    with pytest.raises(ValueError, match="network mode"):
        BuildkitdSettings(Path("/c.sock"), network="bridge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bridge name"):
        CniBridge("a-bridge-name-too-long", "10.231.7.0/24")
    with pytest.raises(ValueError):
        CniBridge("hpbk0", "10.231.7.0/33")


# A stand-in buildkitd: binds the socket its config names, mounts nothing, exits on
# SIGTERM (or ignores it when told to). buildctl "debug workers" answers once the socket
# exists.
FAKE_BUILDKITD = """\
import os, signal, socket, sys, time, tomllib
config = tomllib.load(open(sys.argv[sys.argv.index("--config") + 1], "rb"))
if os.environ.get("FAKE_MODE") == "fail":
    print("no worker found", flush=True)
    sys.exit(1)
if os.environ.get("FAKE_MODE") == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
path = config["grpc"]["address"][0].removeprefix("unix://")
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen()
print("running, TMPDIR=" + os.environ["TMPDIR"], flush=True)
while True:
    time.sleep(1)
"""

FAKE_BUILDCTL = """\
import os, sys
address = sys.argv[sys.argv.index("--addr") + 1].removeprefix("unix://")
if sys.argv[-2:] == ["debug", "workers"] and os.path.exists(address):
    print("ID\\tPLATFORMS\\nw1\\tlinux/amd64")
    sys.exit(0)
sys.exit(1)
"""


@pytest.fixture
def binaries(tmp_path: Path) -> BuildkitBinaries:
    made = []
    for name, source in (("buildkitd", FAKE_BUILDKITD), ("buildctl", FAKE_BUILDCTL)):
        path = tmp_path / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(source))
        path.chmod(0o755)
        made.append(path)
    return BuildkitBinaries(*made)


def test_started_it_serves_and_stopped_it_leaves_only_its_root(
    binaries: BuildkitBinaries, layout: BuildkitdLayout, tmp_path: Path
) -> None:
    log = tmp_path / "buildkitd.log"
    pid = start_buildkitd(binaries, BuildkitdSettings(Path("/c.sock")), layout, log)
    try:
        assert running_pid(layout) == pid
        assert layout.socket.is_socket()
        assert os.getsid(pid) == pid  # its own session: a ^C for the caller misses it
        with pytest.raises(BuildkitdError, match="already runs"):
            start_buildkitd(binaries, BuildkitdSettings(Path("/c.sock")), layout, log)
    finally:
        assert stop_buildkitd(layout) is True
    assert running_pid(layout) is None
    assert sorted(p.name for p in layout.run_dir.iterdir()) == ["buildkitd.toml"]
    assert layout.root.is_dir()
    assert f"TMPDIR={layout.tmp}" in log.read_text()
    assert stop_buildkitd(layout) is False  # idempotent


def test_one_that_cannot_start_is_reported_with_its_log(
    binaries: BuildkitBinaries,
    layout: BuildkitdLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_MODE", "fail")
    log = tmp_path / "buildkitd.log"
    with pytest.raises(BuildkitdError, match=r"(?s)exited with status 1.*no worker found"):
        start_buildkitd(binaries, BuildkitdSettings(Path("/c.sock")), layout, log)
    assert running_pid(layout) is None
    assert not layout.pid_file.exists()


def test_one_that_ignores_sigterm_is_killed(
    binaries: BuildkitBinaries,
    layout: BuildkitdLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_MODE", "stubborn")
    pid = start_buildkitd(binaries, BuildkitdSettings(Path("/c.sock")), layout, tmp_path / "log")
    assert stop_buildkitd(layout, timeout_s=0.5) is True
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_after_a_killed_one_the_next_start_cleans_up_and_a_stale_pid_is_not_believed(
    binaries: BuildkitBinaries, layout: BuildkitdLayout, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    pid = start_buildkitd(binaries, BuildkitdSettings(Path("/c.sock")), layout, tmp_path / "log")
    # A step's snapshot, mounted by buildkitd when it was killed mid-RUN.
    snapshot = layout.root / "containerd-overlayfs/cachemounts/buildkit1065169412"
    snapshot.mkdir(parents=True)
    linux.mount("tmpfs", str(snapshot), "tmpfs")
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # Its socket and pid file are left; the pid file now names no buildkitd of ours.
        assert layout.socket.exists() and layout.pid_file.exists()
        layout.pid_file.write_text(f"{os.getpid()}\n")  # a reused pid: not a buildkitd
        assert running_pid(layout) is None
        pid = start_buildkitd(binaries, BuildkitdSettings(Path("/c.sock")), layout, tmp_path / "l")
        assert running_pid(layout) == pid
        assert linux.mounts_under(str(layout.root)) == []
        assert stop_buildkitd(layout) is True
    finally:
        linux.unmount_all(str(layout.root))
