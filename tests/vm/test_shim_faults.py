"""Faults under the shim's Task service, with real QEMU and the real guest: the VM
killed during Create, Start and Exec and while output streams, a guest kernel panic, a
hung guest (its vCPUs stopped), and the shim's state directory on a full tmpfs.

The service runs in this process, driven as containerd drives it (tests/task_driver.py),
so a fault lands exactly between or during the calls: a VM stopped with SIGSTOP cannot
answer, so a call made then is still in flight when the VM is killed.

For each fault: the task ends with an exit status a client can see, published when the
VM's process exits (not after a timeout: the guard below is far longer than any of the
shim's own timeouts would need to be noticed); Delete works; nothing is left (no VMM
process, state directory, share, mount).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harpoon import dirs, linux
from harpoon.api.agent.v1 import agent_pb2
from harpoon.errdefs import Unavailable
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.sandbox import SandboxStarter
from harpoon.shim import paths
from harpoon.shim.task import TaskService
from harpoon.vmm.backend import QemuBackend
from tests.task_driver import ID, NAMESPACE, SIGKILLED, RecordingPublisher, Shim

pytestmark = pytest.mark.vm

#: What containerd reports for a task whose processes vanished with their VM.
VM_LOST = 255
#: How a call the VM did not live to answer fails.
KILLED_WHILE = "the VM of container 'c1' was killed by SIGKILL while "
#: A guard against a hung test, not a step: far above how long any step takes.
SCENARIO_GUARD_S = 150.0
#: How long a call is left in flight against a stopped VM before the VM is killed.
IN_FLIGHT_S = 0.5
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "cat", "yes", "echo", "true")


@dataclass
class Host:
    base: Path
    run_dir: Path
    bundle: Path
    guest: GuestImage

    @property
    def state_dir(self) -> Path:
        return paths.vm_state_dir(NAMESPACE, ID)

    def vmm_pids(self) -> list[int]:
        """Live VMM processes whose command line names the container's state directory."""
        found = []
        needle = str(self.state_dir).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if needle in cmdline and state != "Z":
                found.append(int(entry))
        return found

    def leftovers(self) -> list[str]:
        found = [f"VMM process {pid}" for pid in self.vmm_pids()]
        for directory in (self.run_dir / "vm", self.run_dir / "share"):
            if directory.is_dir():
                found += [f"{entry}" for entry in directory.iterdir()]
        found += [f"mount {m}" for m in linux.mounts_under(str(self.base))]
        return found


@pytest.fixture
def host(guest: GuestImage, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.skip("the shim mounts the rootfs and runs QEMU: needs root")
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed: run scripts/install-deps")
    # Short: the VM's sockets are under it, and a unix socket's path has 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="hpf", dir="/tmp"))
    run_dir = base / "run"
    monkeypatch.setattr(paths, "RUN_DIR", str(run_dir))
    bundle = base / "bundle"
    rootfs = bundle / "rootfs"
    for directory in ("bin", "proc", "dev", "sys", "tmp"):
        (rootfs / directory).mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    host = Host(base, run_dir, bundle, guest)
    try:
        yield host
    finally:
        for pid in host.vmm_pids():  # only if a test failed half-way
            os.kill(pid, signal.SIGKILL)
        linux.unmount_all(str(base))
        shutil.rmtree(base, ignore_errors=True)


def template_store() -> Path:
    return Path(dirs.template_dir())


def write_config(host: Host, args: list[str], *, sysrq: bool = False) -> None:
    """runc's default spec (`runc spec`, as ctr's is) running args; with sysrq, the
    container may write /proc/sysrq-trigger (it is read-only by default)."""
    subprocess.run(["runc", "spec", "--bundle", str(host.bundle)], check=True)
    config = host.bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["process"].update(args=args, terminal=False)
    spec["root"]["readonly"] = False
    if sysrq:
        spec["linux"]["readonlyPaths"].remove("/proc/sysrq-trigger")
    config.write_text(json.dumps(spec))


def service(host: Host) -> Shim:
    starter = SandboxStarter(QemuBackend())
    return Shim(
        TaskService(NAMESPACE, RecordingPublisher(), starter, lambda: host.guest, lambda: None)
    )


@contextlib.asynccontextmanager
async def shim_for(host: Host) -> AsyncIterator[Shim]:
    shim = service(host)
    try:
        yield shim
    finally:
        if shim.service.container is not None:  # a test that failed half-way
            await shim.service.container.teardown()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(SCENARIO_GUARD_S):
            await scenario()

    asyncio.run(bounded())


async def in_flight(call: Awaitable[object]) -> asyncio.Future[object]:
    """call, started and still unanswered IN_FLIGHT_S later (its VM is stopped)."""
    future = asyncio.ensure_future(call)
    await asyncio.sleep(IN_FLIGHT_S)
    assert not future.done(), f"answered by a stopped VM: {future}"
    return future


async def killed_in_flight(vmm: int, call: Awaitable[object], doing: str) -> None:
    """call, made once the VM is stopped, fails naming the VM's end once it is killed."""
    os.kill(vmm, signal.SIGSTOP)
    future = await in_flight(call)
    os.kill(vmm, signal.SIGKILL)
    with pytest.raises(Unavailable, match=KILLED_WHILE + doing):
        await future


async def the_vm_was_lost(shim: Shim, host: Host) -> None:
    """The VM is gone: the init's exit is published as VM_LOST; Delete then works and
    leaves nothing."""
    assert await shim.wait() == VM_LOST
    assert shim.publisher.exits()[-1] == (ID, VM_LOST)
    assert (await shim.delete()).exit_status == VM_LOST
    assert shim.service.container is None
    assert host.leftovers() == []


def test_the_vm_killed_while_restoring_boots_cold_and_keeps_the_template(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed from outside while its template restores: that says nothing against the
    template, so the template stays, and Create gets a VM by booting one cold."""
    write_config(host, ["sleep", "1000"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            create = asyncio.ensure_future(shim.create(host.bundle))
            while not (pids := host.vmm_pids()):
                assert not create.done(), "Create finished before its VM could be seen"
                await asyncio.sleep(0.002)
            [restoring] = pids
            os.kill(restoring, signal.SIGSTOP)
            await asyncio.sleep(IN_FLIGHT_S)
            assert not create.done(), "Create finished with its VM stopped"
            os.kill(restoring, signal.SIGKILL)
            vmm = (await create).pid
            assert vmm != restoring
            await shim.start()
            await shim.kill(signal.SIGKILL)
            assert await shim.wait() == SIGKILLED
            await shim.delete()
            assert host.leftovers() == []

    run(scenario)
    restores = [r.getMessage() for r in caplog.records if "booting cold" in r.getMessage()]
    if not restores:
        pytest.skip("no template to restore from: the VM booted cold from the start")
    [failed] = restores
    template = failed.split("from template ")[1].split()[0]
    assert any(template in p.name for p in template_store().iterdir()), failed


def test_the_vm_killed_during_create_fails_the_create_and_leaves_nothing(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed as Create asks the guest to create the container (its VM is up)."""
    write_config(host, ["sleep", "1000"])
    create_process = AgentClient.create_process

    async def killed_first(agent: AgentClient, request: agent_pb2.CreateProcessRequest) -> None:
        [vmm] = host.vmm_pids()
        os.kill(vmm, signal.SIGKILL)
        await create_process(agent, request)

    monkeypatch.setattr(AgentClient, "create_process", killed_first)

    async def scenario() -> None:
        async with shim_for(host) as shim:
            with pytest.raises(Unavailable, match=KILLED_WHILE + "creating the container"):
                await shim.create(host.bundle)
            assert shim.service.container is None
            assert shim.publisher.topics == []
            assert host.leftovers() == []

    run(scenario)


def test_the_vm_killed_during_start_fails_the_start_and_ends_the_task(host: Host) -> None:
    write_config(host, ["sleep", "1000"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            vmm = (await shim.create(host.bundle)).pid
            await killed_in_flight(vmm, shim.start(), "starting its init process")
            await the_vm_was_lost(shim, host)

    run(scenario)


def test_the_vm_killed_during_exec_fails_the_exec_and_ends_the_task(host: Host) -> None:
    write_config(host, ["sleep", "1000"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            vmm = (await shim.create(host.bundle)).pid
            await shim.start()
            await killed_in_flight(vmm, shim.exec("e1", ["true"]), "creating exec 'e1'")
            await the_vm_was_lost(shim, host)

    run(scenario)


def test_the_vm_killed_while_output_streams_ends_the_task_and_the_output(host: Host) -> None:
    write_config(host, ["yes", "streaming"])
    fifo = host.base / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    async def scenario() -> None:
        async with shim_for(host) as shim:
            vmm = (await shim.create(host.bundle, stdout=str(fifo))).pid
            await shim.start()
            received = b""
            while len(received) < 1 << 20:  # a MiB: the stream is flowing
                await asyncio.sleep(0.01)
                with contextlib.suppress(BlockingIOError):
                    received += os.read(reader, 1 << 16)
            assert received.startswith(b"streaming\n")
            os.kill(vmm, signal.SIGKILL)
            await the_vm_was_lost(shim, host)
            # The client's end reads to its end: the shim has closed the FIFO.
            while True:
                try:
                    if not os.read(reader, 1 << 16):
                        break
                except BlockingIOError:
                    await asyncio.sleep(0.01)

    try:
        run(scenario)
    finally:
        os.close(reader)


def test_a_guest_kernel_panic_ends_the_task_and_leaves_nothing(host: Host) -> None:
    """The guest's agent is its init: if it dies, the kernel panics, so this is also
    what an agent that dies looks like from the host."""
    write_config(host, ["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 1000"], sysrq=True)

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            await shim.start()
            await the_vm_was_lost(shim, host)

    run(scenario)


def test_a_hung_guest_is_killed_by_sigkill_and_deleted(host: Host) -> None:
    """vCPUs stopped (the whole VMM stopped): the agent cannot answer, so a SIGKILL for
    the container kills its VM; the init then ended by SIGKILL, as the client asked."""
    write_config(host, ["sleep", "1000"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            vmm = (await shim.create(host.bundle)).pid
            await shim.start()
            os.kill(vmm, signal.SIGSTOP)
            await shim.kill(signal.SIGKILL, all=True)
            assert await shim.wait() == SIGKILLED
            assert (await shim.delete()).exit_status == SIGKILLED
            assert host.leftovers() == []

    run(scenario)


def fill(directory: Path) -> int:
    """Fills a filesystem's blocks with one file, then its inodes with empty ones: how
    many of those."""
    with open(directory / "filler", "wb", buffering=0) as blocks, contextlib.suppress(OSError):
        while True:
            blocks.write(b"\0" * 4096)
    count = 0
    with contextlib.suppress(OSError):
        while True:
            (directory / f"i{count}").touch()
            count += 1
    return count


def test_a_full_state_directory_fails_create_clearly_and_leaves_nothing(host: Host) -> None:
    write_config(host, ["true"])
    host.run_dir.mkdir()
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=64k,nr_inodes=64,mode=0700",
            "tmpfs",
            str(host.run_dir),
        ],
        check=True,
    )
    filler = fill(host.run_dir)

    async def scenario() -> None:
        async with shim_for(host) as shim:
            with pytest.raises(Exception, match="No space left") as refused:
                await shim.create(host.bundle)
            print(f"Create refused: {refused.value}")
            assert shim.service.container is None
            assert host.vmm_pids() == []
            assert linux.mounts_under(str(host.bundle)) == []

    run(scenario)
    leftover = sorted(p.name for p in host.run_dir.iterdir())
    assert leftover == sorted(["filler", *(f"i{n}" for n in range(filler))])
