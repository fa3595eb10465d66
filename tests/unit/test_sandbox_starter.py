"""The VM started ahead of Create (SandboxStarter), without a VM: what Create gets, and
that every sandbox nobody takes is stopped, whatever happens in between."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from harpoon.sandbox.plan import LaunchPlan
from harpoon.sandbox.sandbox import Sandbox, SandboxStarter
from harpoon.vmm.backend import QemuBackend
from harpoon.vmm.base import VMConfig, VMError


class FakeSandbox:
    def __init__(self, plan: LaunchPlan, log: list[str], start: float, fail: bool) -> None:
        self.plan, self.config, self.rootfs_share, self.log = (
            plan,
            plan.config,
            plan.rootfs_share,
            log,
        )
        self.start_s, self.fail = start, fail
        self.started = self.stopped = False

    async def start(self) -> None:
        self.log.append(f"start {self.config.name}")
        await asyncio.sleep(self.start_s)
        if self.fail:
            raise VMError("the guest did not answer")
        self.started = True

    async def stop(self) -> None:
        self.log.append(f"stop {self.config.name}")
        self.stopped = True


class FakeStarter(SandboxStarter):
    def __init__(self, start_s: float = 0.05, fail: set[str] | None = None) -> None:
        super().__init__(QemuBackend())  # never asked for a VM: new() makes fakes
        self.log: list[str] = []
        self.made: list[FakeSandbox] = []
        self.start_s, self.fail = start_s, fail or set()

    def new(self, plan: LaunchPlan) -> Sandbox:
        sandbox = FakeSandbox(plan, self.log, self.start_s, plan.config.name in self.fail)
        self.made.append(sandbox)
        return sandbox  # type: ignore[return-value]


def config(name: str = "c1", memory_mib: int = 256) -> VMConfig:
    return VMConfig(name=name, arch="amd64", kernel=Path("/k"), initrd=Path("/i"),
                    state_dir=Path(f"/run/harpoon/vm/{name}"), memory_mib=memory_mib)  # fmt: skip


SHARE = Path("/run/harpoon/share/x")


def plan(name: str = "c1", memory_mib: int = 256, share: Path = SHARE) -> LaunchPlan:
    return LaunchPlan(config(name, memory_mib), share)


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_create_takes_the_vm_started_ahead_for_the_same_configuration() -> None:
    async def scenario() -> tuple[FakeStarter, object]:
        starter = FakeStarter()
        starter.prestart(plan())
        sandbox = await starter.start(plan())
        await starter.close()  # the daemon exits: what Create took is not the starter's
        return starter, sandbox

    starter, sandbox = run(scenario())  # type: ignore[misc]
    assert sandbox is starter.made[0] and starter.made[0].started
    assert starter.log == ["start c1"]


def test_another_configuration_stops_the_early_vm_before_starting_its_own() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter()
        starter.prestart(plan())
        await asyncio.sleep(0.01)  # it is starting when Create comes
        sandbox = await starter.start(plan(memory_mib=512))
        assert sandbox is starter.made[1]
        return starter

    starter = run(scenario())
    assert starter.log == ["start c1", "stop c1", "start c1"]  # type: ignore[attr-defined]
    assert starter.made[0].stopped and not starter.made[1].stopped  # type: ignore[attr-defined]


def test_another_share_is_another_configuration() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter()
        starter.prestart(plan())
        await starter.start(plan(share=Path("/elsewhere")))
        return starter

    starter = run(scenario())
    assert starter.made[0].stopped and len(starter.made) == 2  # type: ignore[attr-defined]


def test_an_early_vm_that_failed_is_stopped_and_replaced() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter(fail={"c1"})
        starter.prestart(plan())
        await asyncio.sleep(0.1)  # it fails before Create comes
        starter.fail.clear()
        sandbox = await starter.start(plan())
        assert sandbox is starter.made[1] and starter.made[1].started
        return starter

    starter = run(scenario())
    assert starter.log == ["start c1", "stop c1", "start c1"]  # type: ignore[attr-defined]


def test_a_new_vm_that_fails_is_stopped_and_the_error_raised() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter(fail={"c1"})
        with pytest.raises(VMError):
            await starter.start(plan())
        return starter

    starter = run(scenario())
    assert starter.log == ["start c1", "stop c1"]  # type: ignore[attr-defined]


def test_without_create_the_early_vm_expires() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter()
        starter.prestart(plan(), expire_after_s=0.2)
        await asyncio.sleep(0.4)
        # A Create after that starts a VM of its own.
        sandbox = await starter.start(plan())
        assert sandbox is starter.made[1]
        return starter

    starter = run(scenario())
    assert starter.log == ["start c1", "stop c1", "start c1"]  # type: ignore[attr-defined]


def test_shutdown_while_the_early_vm_starts_stops_it() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter(start_s=10)
        starter.prestart(plan())
        await asyncio.sleep(0.05)
        await starter.close()
        await starter.close()  # idempotent
        return starter

    starter = run(scenario())
    assert starter.log == ["start c1", "stop c1"]  # type: ignore[attr-defined]
    assert not starter.made[0].started  # type: ignore[attr-defined]


def test_a_cancelled_create_leaves_the_early_vm_to_the_starter() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter(start_s=0.3)
        starter.prestart(plan())
        create = asyncio.ensure_future(starter.start(plan()))
        await asyncio.sleep(0.05)
        create.cancel()
        with pytest.raises(asyncio.CancelledError):
            await create
        assert starter.log == ["start c1"]  # still starting, still the starter's
        retried = await starter.start(plan())  # a retried Create takes it
        assert retried is starter.made[0] and retried.started  # type: ignore[attr-defined]
        return starter

    starter = run(scenario())
    assert starter.log == ["start c1"]  # type: ignore[attr-defined]


def test_without_a_prestart_create_starts_its_own() -> None:
    async def scenario() -> FakeStarter:
        starter = FakeStarter()
        sandbox = await starter.start(plan())
        assert sandbox is starter.made[0]
        await starter.close()
        return starter

    starter = run(scenario())
    assert starter.log == ["start c1"]  # type: ignore[attr-defined]


def test_a_create_waiting_for_a_slow_early_vm_is_not_cut_short_by_the_expiry() -> None:
    async def scenario() -> tuple[FakeStarter, object]:
        starter = FakeStarter(start_s=0.4)  # a cold boot, say
        starter.prestart(plan(), expire_after_s=0.2)
        await asyncio.sleep(0.05)
        sandbox = await starter.start(plan())
        await asyncio.sleep(0.3)
        return starter, sandbox

    starter, sandbox = run(scenario())  # type: ignore[misc]
    assert sandbox is starter.made[0] and not starter.made[0].stopped
    assert starter.log == ["start c1"]
