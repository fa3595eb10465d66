"""A vfkit VM's lifetime on the host (harpoon.vmm.vfkit, vfkit_launch): started, paused,
stopped, killed, launched early, found by `shim delete` after a killed shim, and its
gvproxy NIC. vfkit is a stand-in program here (tests/unit/fake_vfkit.py): these are the
host's steps; a real guest through harpoon's vfkit double is tests/vm/test_vfkit.py's."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harpoon.vmm import leftovers
from harpoon.vmm.backend import VfkitBackend
from harpoon.vmm.base import VMConfig, VMError
from harpoon.vmm.devices import NIC, StreamBackend
from harpoon.vmm.vfkit_launch import PROGRAM_ENV, rest_socket

pytestmark = pytest.mark.timeout(60)

FAKE_VFKIT = Path(__file__).with_name("fake_vfkit.py")


@pytest.fixture
def base() -> Iterator[Path]:
    # Short: the VM's sockets are under it, and a unix socket's path has 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def program(base: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The stand-in, installed as the vfkit program ($HARPOON_VFKIT)."""
    path = base / "vfkit"
    path.write_text(f"#!{sys.executable} -I\n{FAKE_VFKIT.read_text()}")
    path.chmod(0o755)
    monkeypatch.setenv(PROGRAM_ENV, str(path))
    for variable in ("FAKE_VFKIT_BOOT_S", "FAKE_VFKIT_FAIL", "FAKE_VFKIT_ARGV"):
        monkeypatch.delenv(variable, raising=False)
    return str(path)


def vm_config(base: Path) -> VMConfig:
    for name in ("kernel", "initrd"):
        (base / name).write_bytes(b"\0" * 64)
    from harpoon.vmm.backend import host_arch

    return VMConfig(name="c1", arch=host_arch(), kernel=base / "kernel", initrd=base / "initrd",
                    state_dir=base / "vm" / "c1")  # fmt: skip


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_start_returns_once_the_agent_socket_listens_and_stop_ends_vfkit_cleanly(
    base: Path, program: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VFKIT_BOOT_S", "0.3")
    monkeypatch.setenv("FAKE_VFKIT_ARGV", str(base / "argv"))
    config = vm_config(base)

    async def scenario() -> None:
        vm = VfkitBackend().new_vm(config)
        assert not vm.agent_waits_for_guest
        began = time.monotonic()
        await vm.start()
        assert time.monotonic() - began >= 0.3  # it waited for the VM to run
        assert config.agent_socket.is_socket()
        # Its pid is in the state directory at once, for `shim delete`.
        assert config.pid_file.read_text() == f"{vm.pid}\n"
        assert vm.exit_status is None
        assert vm.console_tail() == "VM running\n"
        await vm.freeze()
        await vm.thaw()
        with pytest.raises(VMError, match=r"vfkit refused Resume: .*Invalid virtual machine state"):
            await vm.thaw()
        await vm.stop()  # HardStop: vfkit exits by itself, cleanly
        assert vm.exit_status == 0
        await vm.stop()  # again: nothing to do
        assert await vm.wait() == 0

    asyncio.run(scenario())
    argv = (base / "argv").read_text().split("\n")
    assert argv[argv.index("--restful-uri") + 1] == f"unix://{rest_socket(config)}"
    assert not config.agent_socket.exists() and not rest_socket(config).exists()


def test_kill_ends_vfkit_at_once_and_removes_what_it_left(base: Path, program: str) -> None:
    config = vm_config(base)

    async def scenario() -> None:
        vm = VfkitBackend().new_vm(config)
        await vm.start()
        await vm.kill()
        assert vm.exit_status == -signal.SIGKILL

    asyncio.run(scenario())
    assert not config.agent_socket.exists() and not rest_socket(config).exists()


def test_a_vfkit_that_exits_before_the_vm_runs_is_an_error_with_its_words(
    base: Path, program: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VFKIT_FAIL", "kernel must be uncompressed")

    async def scenario() -> None:
        vm = VfkitBackend().new_vm(vm_config(base))
        with pytest.raises(
            VMError,
            match="vfkit exited with status 1 before the VM ran; "
            "vfkit said: Error: kernel must be uncompressed",
        ):
            await vm.start()

    asyncio.run(scenario())


def test_without_vfkit_the_vm_cannot_be_made(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRAM_ENV, raising=False)
    monkeypatch.setenv("PATH", str(base))
    monkeypatch.setenv("HARPOON_CONFIG", str(base / "none.toml"))
    (base / "none.toml").write_text("")
    with pytest.raises(
        VMError, match=r"vfkit not found \(brew install vfkit; or set HARPOON_VFKIT\)"
    ):
        VfkitBackend().new_vm(vm_config(base))


def test_a_vm_launched_early_is_taken_by_the_vm_for_the_same_config(
    base: Path, program: str
) -> None:
    config = vm_config(base)
    backend = VfkitBackend()
    backend.launch_early(config, None)
    pid = int(config.pid_file.read_text())

    async def scenario() -> None:
        vm = backend.new_vm(config)
        await vm.start()
        assert vm.pid == pid  # the early launch's vfkit
        await vm.kill()
        await backend.discard_early()  # taken: nothing to discard

    asyncio.run(scenario())
    with pytest.raises(VMError, match="vfkit cannot restore a saved guest"):
        VfkitBackend().launch_early(config, base / "state")


def test_a_vm_launched_early_for_another_config_is_ended(base: Path, program: str) -> None:
    config = vm_config(base)
    backend = VfkitBackend()
    backend.launch_early(config, None)
    early = int(config.pid_file.read_text())

    async def scenario() -> None:
        vm = backend.new_vm(replace(config, memory_mib=512))
        await vm.start()
        assert vm.pid != early and not running(early)
        await vm.kill()

    asyncio.run(scenario())


def shim_with_a_vm(
    config: VMConfig, then: str, **popen: Any
) -> tuple[subprocess.Popen[bytes], int]:
    """A stand-in shim: a process that starts a vfkit VM of config, then runs `then`;
    and the VM's pid."""
    script = (
        "import asyncio, sys, time\n"
        "from harpoon.vmm.backend import VfkitBackend\n"
        "from harpoon.vmm.base import VMConfig\n"
        "from pathlib import Path\n"
        f"config = VMConfig(name='c1', arch={config.arch!r}, kernel=Path({str(config.kernel)!r}),"
        f" initrd=Path({str(config.initrd)!r}), state_dir=Path({str(config.state_dir)!r}))\n"
        "vm = VfkitBackend().new_vm(config)\n"
        "asyncio.run(vm.start())\n"
        "print(vm.pid, flush=True)\n"
        f"{then}\n"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    shim = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(src)},
        **popen,
    )
    assert shim.stdout is not None
    return shim, int(shim.stdout.readline())


def test_shim_delete_after_a_killed_shim_kills_its_vfkit(base: Path, program: str) -> None:
    """A shim killed with SIGKILL leaves its VM's state directory: `delete` finds the
    vfkit by its pid file (harpoon.vmm.leftovers), as it finds a QEMU. (On Linux vfkit
    also gets the shim's parent-death signal: the shim here is a child process.)"""
    config = vm_config(base)
    shim, pid = shim_with_a_vm(
        config, "sys.stdin.read()", stdin=subprocess.PIPE, start_new_session=True
    )
    try:
        assert running(pid)
        # The vfkit outlives no one here but for the test: its parent-death signal is
        # the thread's that spawned it, so stop the shim with SIGSTOP, not SIGKILL, to
        # see `delete` do it.
        os.kill(shim.pid, signal.SIGSTOP)
        assert leftovers.kill_vmm(str(config.state_dir)) == pid
        assert not running(pid)
    finally:
        shim.kill()
        shim.wait()


def test_a_vfkit_dies_with_the_shim_that_started_it_on_linux(base: Path, program: str) -> None:
    if sys.platform != "linux":
        pytest.skip("macOS has no parent-death signal: `shim delete` ends it")
    config = vm_config(base)
    shim, pid = shim_with_a_vm(config, "time.sleep(60)")
    shim.kill()
    shim.wait()
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not running(pid)
    # What it could not remove is the next VM's to remove (vfkit_launch.launch).
    leftovers.kill_vmm(str(config.state_dir))


def test_a_gvproxy_nic_gets_a_gvproxy_listening_for_vfkit_ended_with_the_vm(
    base: Path, program: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harpoon.devenv.tools import GVPROXY
    from tests.prerequisites import unavailable

    if GVPROXY.missing_binaries():
        unavailable(f"gvproxy is not built: {GVPROXY.install_hint()}")
    monkeypatch.setenv("HARPOON_GVPROXY", str(GVPROXY.binary))
    nic = NIC("eth0", "02:00:00:00:00:01", StreamBackend(base / "unused.sock", gvproxy=True))
    config = replace(vm_config(base), nics=(nic,))

    async def scenario() -> None:
        vm = VfkitBackend().new_vm(config)
        await vm.start()
        pid = int((config.state_dir / "gvproxy.pid").read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
        net = config.state_dir / "gvproxy-net.sock"
        assert argv[argv.index(b"-listen-vfkit") + 1] == f"unixgram://{net}".encode()
        assert net.is_socket()
        await vm.stop()
        assert not running(pid)

    asyncio.run(scenario())
    assert sorted(p.name for p in config.state_dir.iterdir()) == [
        "console.log", "vmm.log", "vmm.pid"
    ]  # fmt: skip
