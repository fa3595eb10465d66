"""A VM launched before the event loop exists (harpoon.shim.prestart.launch): the
shim spawns QEMU before it loads asyncio, the QemuVM that asks for exactly that launch
runs it, and a launch nobody takes is ended, never left running.

QEMU is a stand-in script here: these are the host's steps, not a guest's."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harpoon.vmm.base import VMConfig
from harpoon.vmm.process import VmmProcess
from harpoon.vmm.qemu_launch import Prelaunched, QemuLaunch

SRC = Path(__file__).resolve().parents[2] / "src"


def config(tmp_path: Path, memory_mib: int = 256) -> VMConfig:
    return VMConfig(name="c1", arch="amd64", kernel=tmp_path / "k", initrd=tmp_path / "i",
                    state_dir=tmp_path / "vm", memory_mib=memory_mib)  # fmt: skip


def sleeper(tmp_path: Path) -> VmmProcess:
    return VmmProcess.spawn(["sleep", "60"], stderr_path=tmp_path / "log", preexec=os.setsid)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Waits for a condition nothing signals (a file another process writes)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not after {timeout_s} s: {what}"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """Exited and reaped (no zombie left)."""
    return not os.path.exists(f"/proc/{pid}")


def test_a_process_is_waited_for_by_every_waiter_even_when_one_gives_up(tmp_path: Path) -> None:
    release = tmp_path / "release"
    os.mkfifo(release)

    async def scenario() -> tuple[int, int]:
        # Exits (3) once the test writes to the fifo, not after some time.
        process = VmmProcess.spawn(
            ["sh", "-c", f"read line < {release}; exit 3"],
            stderr_path=tmp_path / "log",
            preexec=os.setsid,
        )
        impatient = asyncio.ensure_future(process.wait())
        patient = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait({impatient, patient}, timeout=0.05)
        assert not done  # both wait: the process cannot exit yet
        impatient.cancel()
        with open(release, "w") as fifo:  # opens once the shell reads it
            fifo.write("go\n")
        return await patient, await process.wait()

    assert asyncio.run(scenario()) == (3, 3)


def test_a_launch_is_taken_by_the_vm_that_asks_for_exactly_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        process = sleeper(tmp_path)
        state = tmp_path / "state"
        prelaunched = Prelaunched(
            QemuLaunch(config(tmp_path), state, config(tmp_path), process, True)
        )
        launched = await prelaunched.take(config(tmp_path), state)
        assert launched is not None and launched.process is process
        assert await prelaunched.take(config(tmp_path), state) is None  # taken once
        await prelaunched.discard()  # no longer its to end
        assert process.returncode is None
        process.kill()
        await process.wait()

    asyncio.run(scenario())


@pytest.mark.parametrize("asked", ["another config", "a boot", "nobody"])
def test_a_launch_nobody_asks_for_is_ended(tmp_path: Path, asked: str) -> None:
    async def scenario() -> int:
        process = sleeper(tmp_path)
        state = tmp_path / "state"
        prelaunched = Prelaunched(
            QemuLaunch(config(tmp_path), state, config(tmp_path), process, True)
        )
        if asked == "another config":
            assert await prelaunched.take(config(tmp_path, memory_mib=512), state) is None
        elif asked == "a boot":
            assert await prelaunched.take(config(tmp_path), None) is None
        else:
            await prelaunched.discard()
        return process.pid

    assert gone(asyncio.run(scenario()))


FAKE_QEMU = """\
#!/bin/sh
# Lists its machines like QEMU; otherwise records its arguments (whole, by a rename)
# and waits to be killed.
if [ "$1" = "-M" ] && [ "$2" = "help" ]; then
  printf 'Supported machines are:\\nmicrovm  microvm (i386)\\nq35  Standard PC\\n'
  exit 0
fi
echo "$@" > "$FAKE_QEMU_ARGS.partial"
mv "$FAKE_QEMU_ARGS.partial" "$FAKE_QEMU_ARGS"
exec sleep 60
"""


def fake_qemu_and_guest(tmp_path: Path) -> tuple[Path, Path]:
    """A fake QEMU on a PATH directory, and a fake guest image: (that directory, the image)."""
    bin_dir, guest = tmp_path / "bin", tmp_path / "guest" / "amd64" / "0123456789abcdef"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU)
    qemu.chmod(0o755)
    guest.mkdir(parents=True)
    for name in ("vmlinux", "initrd.cpio"):
        (guest / name).write_bytes(b"")
    manifest = {"arch": "amd64", "kernel": "vmlinux", "initrd": "initrd.cpio",
                "kernel_release": "6.1", "digest": "0123456789abcdef"}  # fmt: skip
    (guest / "manifest.json").write_text(json.dumps(manifest))
    (guest.parent / "current").symlink_to(guest.name)
    return bin_dir, guest


def test_the_daemon_launches_the_vm_before_it_loads_asyncio(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The bundle's VM is launched (here without a template: a boot) by a process that
    has not imported asyncio or protobuf, with the rootfs export ready for QEMU."""
    bin_dir, guest = fake_qemu_and_guest(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    script = textwrap.dedent(f"""
        import sys
        from harpoon.shim import prestart
        early = prestart.launch("ns", "c1", {str(bundle)!r})
        assert early.plan is not None and early.backend._early is not None
        launched = early.backend._early._launched
        print(launched.process.pid)
        loaded = {{"asyncio", "google.protobuf"}} & set(sys.modules)
        assert not loaded, f"loaded before the VM was launched: {{loaded}}"
        import os, time
        deadline = time.monotonic() + 10
        while not os.path.exists(os.environ["FAKE_QEMU_ARGS"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        launched.process.kill()
        launched.process._popen.wait()
    """)
    # Short: the VM's unix sockets (a host-network VM's gvproxy's too) live under it.
    run_dir = Path(tempfile.mkdtemp(prefix="hp-run-"))
    request.addfinalizer(lambda: shutil.rmtree(run_dir, ignore_errors=True))
    env = dict(
        os.environ,
        PYTHONPATH=str(SRC),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        HARPOON_GUEST_DIR=str(tmp_path / "guest"),
        HARPOON_RUN_DIR=str(run_dir),
        HARPOON_ACCEL="tcg",
        HARPOON_TEMPLATES="off",
        FAKE_QEMU_ARGS=str(tmp_path / "qemu-args"),
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert gone(int(result.stdout))
    args = (tmp_path / "qemu-args").read_text()
    assert "-incoming" not in args and f"-kernel {guest}/vmlinux" in args
    share = next(run_dir.glob("share/*"))
    assert f"path={share}," in args and os.listdir(share) == ["rootfs"]


FAKE_RESTORING_QEMU = """\
#!/bin/sh
# Records the files it holds open ("fd path" lines), then its arguments.
for fd in /proc/$$/fd/*; do echo "${fd##*/} $(readlink "$fd")"; done > "$FAKE_QEMU_ARGS.fds"
echo "$@" > "$FAKE_QEMU_ARGS.partial"
mv "$FAKE_QEMU_ARGS.partial" "$FAKE_QEMU_ARGS"
exec sleep 60
"""


def test_a_restore_hands_qemu_the_state_file_as_an_inherited_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU waits for `migrate-incoming` and reads the state from a file it inherits
    (no `sh -c cat` per restore); the shim keeps no copy of that fd."""
    from harpoon.vmm import qemu_launch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(FAKE_RESTORING_QEMU)
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_QEMU_ARGS", str(tmp_path / "qemu-args"))
    monkeypatch.setattr(qemu_launch, "supported_machines", lambda binary: frozenset({"microvm"}))
    monkeypatch.setattr(qemu_launch.accel, "choose", lambda binary: "tcg")
    state = tmp_path / "state"
    state.write_bytes(b"saved device state")
    before = set(os.listdir("/proc/self/fd"))

    launched = qemu_launch.launch(config(tmp_path), state)
    try:
        args_file = tmp_path / "qemu-args"
        wait_until(args_file.exists, "the fake QEMU recorded its arguments")
        args = args_file.read_text().split()
    finally:
        launched.process.kill()
        asyncio.run(launched.process.wait())
    assert args[args.index("-incoming") + 1] == "defer"
    # QEMU holds the state open at the fd number migrate-incoming will name.
    assert launched.incoming is not None and launched.incoming.startswith("fd:")
    held = dict(
        line.split(" ", 1) for line in (tmp_path / "qemu-args.fds").read_text().splitlines()
    )
    assert held[launched.incoming.removeprefix("fd:")] == str(state)
    assert set(os.listdir("/proc/self/fd")) == before  # the state file is QEMU's alone


def test_a_bundle_the_plan_refuses_launches_no_vm(tmp_path: Path) -> None:
    """A Create that config.json already shows must fail (here: a bind mount of a host
    path that does not exist) fails before any VM: the daemon's early step plans, is
    refused, and launches nothing."""
    from harpoon.shim import prestart

    bin_dir, _ = fake_qemu_and_guest(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    mount = {"destination": "/data", "type": "bind", "source": str(tmp_path / "missing")}
    spec = {"process": {"args": ["true"]}, "mounts": [mount]}
    (bundle / "config.json").write_text(json.dumps(spec))
    environment = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HARPOON_GUEST_DIR": str(tmp_path / "guest"),
        "HARPOON_ACCEL": "tcg",
        "HARPOON_TEMPLATES": "off",
        "FAKE_QEMU_ARGS": str(tmp_path / "qemu-args"),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        early = prestart.launch("ns", "c1", str(bundle))
    assert early.plan is None
    assert early.backend._early is None  # type: ignore[attr-defined]
    assert not (tmp_path / "qemu-args").exists()
