"""VM templates with a real guest: build one, restore VMs from it, survive a broken one.

Every template here lives in a temporary store; after each test no QEMU started for it
may still run and no build or discard directory may remain.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.guest import GuestImage
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.plan import launch_early, plan_launch
from harpoon.sandbox.sandbox import Sandbox, SandboxStarter
from harpoon.sandbox.template import (
    MEMORY_NAME,
    STATE_NAME,
    Template,
    TemplateStore,
    template_key,
)
from harpoon.sandbox.template_builder import BUILD_LOG_NAME
from harpoon.shim.template_cli import container_config
from harpoon.vmm.backend import QemuBackend
from harpoon.vmm.base import Share, VMConfig

if TYPE_CHECKING:
    from tests.vm.conftest import RunInGuest

BACKEND = QemuBackend()
pytestmark = pytest.mark.vm
Run = Callable[..., Awaitable[tuple[int, bytes]]]

NINEP = ["trans=virtio", "version=9p2000.L"]
BUILDER_WAIT_S = 300.0
CLOCK_SLACK_S = 3


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hp-tpl-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def store(workdir: Path) -> TemplateStore:
    return TemplateStore(workdir / "templates")


@pytest.fixture(scope="module")
def template(guest: GuestImage, store: TemplateStore) -> Template:
    built = asyncio.run(store.build(container_config(guest, BACKEND), BACKEND))
    assert built is not None
    return built


def processes_under(directory: Path) -> list[str]:
    """The command lines of live processes (QEMU, its `cat`) naming paths under directory."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_text().replace("\0", " ")
            if entry.name.isdigit() and str(directory) in cmdline:
                found.append(f"{entry.name}: {cmdline[:300]}")
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(workdir: Path) -> Iterator[None]:
    yield
    assert processes_under(workdir) == []
    templates = workdir / "templates"
    if templates.exists():
        assert [p.name for p in templates.glob(".*")] == []


def sandbox_config(guest: GuestImage, workdir: Path, name: str, share: Path) -> VMConfig:
    config = container_config(guest, BACKEND)
    from dataclasses import replace

    return replace(
        config,
        name=name,
        state_dir=workdir / "vms" / name,
        shares=(Share("rootfs", share),),
    )


@pytest.fixture(scope="module")
def run(guest_process: RunInGuest) -> Run:
    """args in a guest container (conftest) to its exit: status, stdout."""

    async def run(agent: AgentClient, process_id: str, *args: str) -> tuple[int, bytes]:
        status, out, _ = await guest_process(agent, process_id, *args)
        return status, out

    return run


def share_with(workdir: Path, name: str, content: str) -> Path:
    directory = workdir / "shares" / name
    directory.mkdir(parents=True)
    (directory / "only-here").write_text(content)
    return directory


def test_a_built_template_is_published_whole(template: Template, store: TemplateStore) -> None:
    assert store.find(template.key) == template
    # The devices only: the guest's RAM is the memory file, mapped by every restore.
    assert template.state.stat().st_size < 1_000_000
    assert template.memory.stat().st_size == 256 << 20
    assert sorted(p.name for p in template.directory.iterdir()) == [
        MEMORY_NAME,
        "meta.json",
        STATE_NAME,
    ]


def test_two_vms_restored_at_once_each_see_their_own_share_and_the_host_clock(
    guest: GuestImage, store: TemplateStore, template: Template, workdir: Path, run: Run
) -> None:
    async def one(name: str) -> tuple[bool, int, bytes, int, float, bytes]:
        share = share_with(workdir, name, f"I am {name}\n")
        sandbox = Sandbox(
            plan_launch(sandbox_config(guest, workdir, name, share), BACKEND, store), BACKEND
        )
        await sandbox.start()
        try:
            agent = sandbox.agent
            assert agent is not None
            await agent.mount("rootfs", "/mnt/own", "9p", NINEP)
            status, content = await run(agent, "cat", "/bin/cat", "/mnt/own/only-here")
            _, guest_time = await run(agent, "date", "/bin/busybox", "date", "+%s")
            _, random = await run(agent, "rand", "/bin/sh", "-c", "head -c 16 /dev/urandom")
            return sandbox.restored, status, content, int(guest_time), time.time(), random
        finally:
            await sandbox.stop()
            shutil.rmtree(sandbox.config.state_dir)

    async def both() -> list[tuple[bool, int, bytes, int, float, bytes]]:
        return list(await asyncio.gather(one("vm-a"), one("vm-b")))

    a, b = asyncio.run(both())
    assert a[:3] == (True, 0, b"I am vm-a\n")
    assert b[:3] == (True, 0, b"I am vm-b\n")
    for result in (a, b):
        assert abs(result[3] - result[4]) <= CLOCK_SLACK_S
    # Hello reseeds each guest's CRNG with host entropy: siblings must differ.
    assert a[5] != b[5], "two guests restored from one template read the same random bytes"


def test_a_corrupt_template_falls_back_to_a_cold_boot_and_is_rebuilt(
    guest: GuestImage, template: Template, workdir: Path, run: Run
) -> None:
    broken_store = TemplateStore(workdir / "broken")
    broken_store.root.mkdir()
    broken = broken_store.root / template.key
    shutil.copytree(template.directory, broken)
    with open(broken / STATE_NAME, "r+b") as state:  # same size: only restoring finds out
        state.write(b"\0" * 4096)

    async def scenario() -> tuple[bool, bool, bytes]:
        share = share_with(workdir, "cold", "cold\n")
        sandbox = Sandbox(
            plan_launch(sandbox_config(guest, workdir, "cold", share), BACKEND, broken_store),
            BACKEND,
        )
        await sandbox.start()
        try:
            discarded = broken_store.find(template.key) is None
            agent = sandbox.agent
            assert agent is not None
            await agent.mount("rootfs", "/mnt/own", "9p", NINEP)
            _, content = await run(agent, "cat", "/bin/cat", "/mnt/own/only-here")
            # The container runs: the sandbox now rebuilds the template in the background.
            for _ in range(1200):
                if broken_store.find(template.key) is not None:
                    break
                await asyncio.sleep(0.1)
            return sandbox.restored, discarded, content
        finally:
            await sandbox.stop()
            shutil.rmtree(sandbox.config.state_dir)
            # It has published the template; let it finish (nothing may be left running).
            if sandbox.template_builder is not None:
                await asyncio.wait_for(sandbox.template_builder.wait(), BUILDER_WAIT_S)

    restored, discarded, content = asyncio.run(scenario())
    assert (restored, discarded, content) == (False, True, b"cold\n")
    rebuilt = broken_store.find(template.key)
    assert rebuilt is not None and rebuilt.state.read_bytes()[:4096] != b"\0" * 4096


def test_a_template_build_outlives_the_sandbox_that_started_it(
    guest: GuestImage, workdir: Path, run: Run
) -> None:
    """A container shorter than a template build (most `--rm` runs under TCG) must leave
    its template built, or every container after it boots cold too: the build runs in
    a process of its own, which ends with the build and leaves nothing behind."""
    empty_store = TemplateStore(workdir / "empty")
    config = sandbox_config(guest, workdir, "short", share_with(workdir, "short", "x\n"))

    async def scenario() -> int:
        sandbox = Sandbox(plan_launch(config, BACKEND, empty_store), BACKEND)
        await sandbox.start()
        try:
            agent = sandbox.agent
            assert agent is not None
            assert not sandbox.restored
            await run(agent, "true", "/bin/true")
            for _ in range(100):  # the builder starts once the process has
                if sandbox.template_builder is not None:
                    break
                await asyncio.sleep(0.1)
        finally:
            await sandbox.stop()
            shutil.rmtree(sandbox.config.state_dir)
        builder = sandbox.template_builder
        assert builder is not None, "no template builder was started"
        assert empty_store.find(key) is None, "built before the sandbox stopped: no test"
        return await asyncio.wait_for(builder.wait(), BUILDER_WAIT_S)

    key = template_key(BACKEND.template_identity(config) or {})
    status = asyncio.run(scenario())
    log = (empty_store.root / BUILD_LOG_NAME).read_text()
    assert status == 0, log
    assert empty_store.find(key) is not None, log
    assert not list(empty_store.root.glob(".build-*"))


def test_a_vm_killed_from_outside_while_it_restores_leaves_its_template(
    guest: GuestImage, store: TemplateStore, template: Template, workdir: Path
) -> None:
    """QEMU SIGKILLed while it restores (the OOM killer, `shim delete`): the container's
    start falls back to a cold boot, and the template, which nothing says is bad, stays."""
    config = sandbox_config(guest, workdir, "killed", share_with(workdir, "killed", "x\n"))

    async def scenario() -> bool:
        sandbox = Sandbox(plan_launch(config, BACKEND, store), BACKEND)
        starting = asyncio.ensure_future(sandbox.start())
        await sandbox.guest_running.wait()  # resumed: loading, its Hello not yet answered
        # The VM's QEMU (not its gvproxy, which names the directory too).
        [qemu] = [line for line in processes_under(config.state_dir) if "qemu-system" in line]
        os.kill(int(qemu.split(":")[0]), signal.SIGKILL)
        try:
            await starting
            return sandbox.restored
        finally:
            await sandbox.stop()
            shutil.rmtree(config.state_dir, ignore_errors=True)

    assert asyncio.run(scenario()) is False, "restored before the kill: no test"
    assert store.find(template.key) == template


def test_an_early_vm_stopped_while_it_restores_leaves_its_template(
    guest: GuestImage, store: TemplateStore, template: Template, workdir: Path
) -> None:
    """What a Create refused for a reason only its request shows (its rootfs mounts)
    does: the VM the daemon launched early from the plan is stopped mid-restore. That
    says nothing about the template, which must stay (and nothing may be left)."""
    config = sandbox_config(guest, workdir, "refused", share_with(workdir, "refused", "x\n"))
    backend = QemuBackend()
    plan = plan_launch(config, backend, store, rootfs_share=None)
    assert plan.template == template

    async def scenario() -> None:
        launch_early(plan, backend)  # as the daemon does, before Create
        starter = SandboxStarter(backend)
        starter.prestart(plan)
        await starter.wait_guest_running(60)
        await starter.close()
        await backend.discard_early()

    asyncio.run(scenario())
    shutil.rmtree(config.state_dir, ignore_errors=True)
    assert store.find(template.key) == template
    assert processes_under(workdir) == []
