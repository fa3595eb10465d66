"""The guest agent in a real VM (QEMU, TCG here), driven through harpoon.sandbox.

One VM is booted per guest architecture for the whole module, the host's (amd64 here)
and arm64 (`-M virt -cpu cortex-a72` under TCG: the guest a Mac runs): these tests speak
to the agent as the shim does, without containerd, and run their commands in guest
containers (conftest: the guest's own root, no namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.plan import plan_launch
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.transform.draft import Draft
from harpoon.shim.transform.guest_runtime import GuestRuntime
from harpoon.ttrpc.status import Code, TtrpcError
from harpoon.vmm.backend import QemuBackend, host_arch
from harpoon.vmm.base import Share, VMConfig
from tests.vm.guests import GUEST_ARCHES, guest_for

if TYPE_CHECKING:
    from tests.vm.conftest import GuestRequest, RunInGuest

BACKEND = QemuBackend()
pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hp-share-") as directory:
        Path(directory, "greeting").write_text("hello from the host\n")
        yield Path(directory)


@pytest.fixture(scope="module")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    return asyncio.DefaultEventLoopPolicy()


class VM:
    """A booted sandbox and a loop to drive it from synchronous tests."""

    def __init__(
        self,
        guest: GuestImage,
        sandbox: Sandbox,
        loop: asyncio.AbstractEventLoop,
        run_in_guest: RunInGuest,
        guest_request: GuestRequest,
    ) -> None:
        self.guest = guest
        self.sandbox = sandbox
        self.loop = loop
        self.run_in_guest = run_in_guest
        self.guest_request = guest_request

    def run(self, coro: object, timeout: float = 120) -> object:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]

    @property
    def agent(self):  # type: ignore[no-untyped-def]
        assert self.sandbox.agent is not None
        return self.sandbox.agent


@pytest.fixture(scope="module", params=GUEST_ARCHES)
def vm(
    request: pytest.FixtureRequest,
    shared_dir: Path,
    guest_process: RunInGuest,
    guest_requests: GuestRequest,
) -> Iterator[VM]:
    guest = guest_for(request.param)
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="hp-vm-") as state:
        config = VMConfig(
            name="agent-test",
            arch=guest.arch,
            kernel=guest.kernel,
            initrd=guest.initrd,
            state_dir=Path(state),
            shares=(Share("data", shared_dir),),
        )
        # Its own configuration (a data share, one vCPU): no template to restore or build.
        sandbox = Sandbox(plan_launch(config, BACKEND, False), BACKEND)
        loop.run_until_complete(sandbox.start())
        try:
            yield VM(guest, sandbox, loop, guest_process, guest_requests)
        finally:
            loop.run_until_complete(sandbox.stop())
            loop.close()


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def run_process(
    vm: VM, process_id: str, *args: str, container_id: str = ""
) -> tuple[int, bytes, bytes]:
    """args in a guest container of its own, or as an exec into the guest container
    container_id (to run beside another container: see conftest)."""
    return await vm.run_in_guest(vm.agent, process_id, *args, container_id=container_id)


def test_hello_reports_the_guest_kernel(vm: VM) -> None:
    assert vm.sandbox.hello is not None
    assert vm.sandbox.hello.kernel_release == vm.guest.kernel_release


def test_process_output_and_exit_status(vm: VM) -> None:
    status, out, err = vm.run(
        run_process(vm, "p1", "/bin/sh", "-c", "echo out; echo err >&2; exit 7")
    )  # type: ignore[misc]
    assert (status, out, err) == (7, b"out\n", b"err\n")


def test_the_guests_loopback_is_up_for_a_container_sharing_its_network(vm: VM) -> None:
    """The guest's network namespace is what a container without one of its own
    (`--net-host`) shares: its `lo` is up, as a host's is (IFF_UP | IFF_LOOPBACK)."""
    status, out, _ = vm.run(run_process(vm, "lo", "/bin/cat", "/sys/class/net/lo/flags"))  # type: ignore[misc]
    assert (status, out) == (0, b"0x9\n")


def test_crun_runs_in_the_guest(vm: VM) -> None:
    """The OCI runtime is in the image with every shared library it needs."""
    status, out, err = vm.run(run_process(vm, "crun-version", "/usr/bin/crun", "--version"))  # type: ignore[misc]
    assert (status, err) == (0, b""), err
    assert out.startswith(b"crun version 1.8.1\n"), out
    assert b"+SECCOMP" in out and b"+CAP" in out


def test_hello_seeds_the_guest_rng(vm: VM) -> None:
    """Nothing reads randomness during boot (PYTHONHASHSEED on the kernel command line):
    the host's entropy credited at Hello must leave getrandom() ready, not blocking."""
    check = "import os; os.getrandom(16, os.GRND_NONBLOCK); print('seeded')"
    status, out, err = vm.run(run_process(vm, "rng", "/usr/bin/python3", "-SBc", check))  # type: ignore[misc]
    assert (status, out, err) == (0, b"seeded\n", b"")


def test_killed_process_reports_128_plus_signal(vm: VM) -> None:
    async def scenario() -> int:
        agent = vm.agent
        await agent.create_process(vm.guest_request("p2", "/bin/sleep", "100"))
        await agent.start_process("p2")
        await agent.signal_process("p2", signal.SIGKILL, False)
        status = (await agent.wait_process("p2")).exit_status
        await agent.delete_process("p2")
        return status

    assert vm.run(scenario()) == 128 + signal.SIGKILL


def test_missing_executable_fails_create_with_a_clear_message(vm: VM) -> None:
    """As runc refuses it: at create, in runc's words, with no errdefs class."""

    async def scenario() -> TtrpcError:
        agent = vm.agent
        try:
            await agent.create_process(vm.guest_request("p3", "no-such-binary"))
        except TtrpcError as error:
            return error
        raise AssertionError("create succeeded")

    error = vm.run(scenario())
    assert isinstance(error, TtrpcError) and error.code == Code.UNKNOWN
    assert error.message == 'exec: "no-such-binary": executable file not found in $PATH'
    with pytest.raises(TtrpcError) as caught:  # and nothing of it is left in the guest
        vm.run(vm.agent.wait_process("p3"))
    assert caught.value.code == Code.NOT_FOUND


def test_unknown_process_is_not_found(vm: VM) -> None:
    with pytest.raises(TtrpcError) as caught:
        vm.run(vm.agent.wait_process("nope"))
    assert caught.value.code == Code.NOT_FOUND


def test_9p_share_is_mounted_and_readable(vm: VM) -> None:
    async def scenario() -> tuple[int, bytes, bytes]:
        await vm.agent.mount("data", "/mnt/data", "9p", ["trans=virtio", "version=9p2000.L"])
        return await run_process(vm, "p4", "/bin/cat", "/mnt/data/greeting")

    assert vm.run(scenario()) == (0, b"hello from the host\n", b"")


def test_large_output_arrives_whole(vm: VM) -> None:
    status, out, _ = vm.run(
        run_process(  # type: ignore[misc]
            vm, "p5", "/bin/sh", "-c", "dd if=/dev/zero bs=65536 count=160 2>/dev/null"
        )
    )
    assert status == 0 and len(out) == 65536 * 160 and set(out) == {0}


def test_a_guest_without_an_agent_is_reported_with_its_console(guest: object) -> None:
    """The floor image prints a marker and powers off: the boot must fail fast, loudly."""
    from harpoon.guest import find_guest
    from harpoon.vmm.base import VMError

    floor = find_guest(host_arch(), which="floor")
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="hp-vm-") as state:
        config = VMConfig(
            name="no-agent", arch=floor.arch, kernel=floor.kernel, initrd=floor.initrd,
            state_dir=Path(state),
        )  # fmt: skip
        # The floor image, which has no agent: nothing to restore, no template to build.
        sandbox = Sandbox(plan_launch(config, BACKEND, False), BACKEND)
        try:
            with pytest.raises(VMError) as caught:
                loop.run_until_complete(asyncio.wait_for(sandbox.start(), 120))
        finally:
            loop.run_until_complete(sandbox.stop())
            loop.close()
    assert "HARPOON-FLOOR-READY" in str(caught.value)
    assert "did not start" in str(caught.value)


def test_an_agent_up_before_its_host_connects_waits_for_it(guest: object) -> None:
    """Until a host connects, the agent's port reads EOF: the agent must reopen it and
    wait, not power off (closing the port raised NotImplementedError in PID 1). The
    shim connects right after QEMU starts, so this is a race it loses only on a host
    too busy to run it for the guest's whole boot; here the host waits on purpose."""
    from harpoon.sandbox.agent_client import AgentClient

    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="hp-vm-") as state:
        config = VMConfig(
            name="late-host", arch=guest.arch, kernel=guest.kernel, initrd=guest.initrd,  # type: ignore[attr-defined]
            state_dir=Path(state),
        )  # fmt: skip
        vm = BACKEND.new_vm(config)

        async def scenario() -> str:
            await vm.start()
            exited = asyncio.ensure_future(vm.wait())
            while "serving harpoon.stdio" not in vm.console_tail():
                assert not exited.done(), vm.console_tail()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # a few of the agent's reopen rounds
            assert not exited.done(), vm.console_tail()
            exited.cancel()
            agent = await AgentClient.connect(str(config.agent_socket), str(config.stdio_socket))
            try:
                return (await agent.hello(60)).kernel_release
            except Exception:
                print(f"guest console:\n{vm.console_tail()}")  # shown with the failure
                raise
            finally:
                await agent.close()

        try:
            assert (
                loop.run_until_complete(asyncio.wait_for(scenario(), 180)) == guest.kernel_release
            )  # type: ignore[attr-defined]
            assert "fatal error" not in vm.console_tail()
        finally:
            loop.run_until_complete(vm.stop())
            loop.close()


# Containers run by the guest's crun, driven as the shim drives them: the start the agent
# does itself (crun 1.8.1's exec.fifo handshake), and the address space randomization
# crun runs without but the container's processes keep. The container's root is made in
# the guest's /tmp from the guest's static busybox.

ROOT = "/tmp/container-root"
STATE = "/run/crun"
SHOW_LAYOUT = "cat /proc/self/personality; grep -m1 stack /proc/self/maps"


def spec(*args: str) -> dict[str, object]:
    """runc spec's defaults, as containerd would send them (less the capabilities), made
    ready for the guest's crun as the shim makes every spec (its guest_runtime step)."""
    draft = Draft("hp-test", "c", runc_spec(*args), "host")
    GuestRuntime().plan(draft)
    return draft.guest_spec


def runc_spec(*args: str) -> dict[str, object]:
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "args": list(args),
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": True,
        },
        "root": {"path": ROOT, "readonly": True},
        "hostname": "c",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
        },
    }


@pytest.fixture(scope="module")
def root(vm: VM) -> Iterator[str]:
    make = (
        f"mkdir -p {ROOT}/bin {ROOT}/proc {ROOT}/dev && cp /bin/busybox {ROOT}/bin/ && "
        f"for tool in sh cat grep sleep; do ln -s busybox {ROOT}/bin/$tool; done"
    )
    assert vm.run(run_process(vm, "make-root", "/bin/sh", "-c", make))[0] == 0
    yield ROOT
    vm.run(run_process(vm, "remove-root", "/bin/rm", "-rf", ROOT))


async def create(vm: VM, container_id: str, config: dict[str, object]) -> None:
    await vm.agent.create_process(
        agent_pb2.CreateProcessRequest(
            id=container_id,
            stdout=True,
            stderr=True,
            container_init=True,
            oci_json=json.dumps(config).encode(),
        )
    )


async def guest_output(vm: VM, process_id: str, command: str, container_id: str = "") -> str:
    status, out, err = await run_process(
        vm, process_id, "/bin/sh", "-c", command, container_id=container_id
    )
    assert status == 0, err
    return out.decode()


async def start_guest_container(vm: VM, container_id: str) -> None:
    """A guest container that sleeps: execs into it run beside other containers."""
    await vm.agent.create_process(vm.guest_request(container_id, "/bin/sleep", "1000"))
    await vm.agent.start_process(container_id)


async def remove_container(vm: VM, container_id: str) -> None:
    """Kills the container's init if it still runs, and deletes the container."""
    with contextlib.suppress(TtrpcError):  # gone already: with the cgroup of another
        await vm.agent.signal_process(container_id, signal.SIGKILL, False)
    await vm.agent.wait_process(container_id)
    await vm.agent.delete_process(container_id)


async def run_container(vm: VM, container_id: str, *args: str) -> bytes:
    await create(vm, container_id, spec(*args))
    out = asyncio.ensure_future(collect(vm.agent.read_output(container_id, agent_pb2.STDOUT)))
    await vm.agent.start_process(container_id)
    assert (await vm.agent.wait_process(container_id)).exit_status == 0
    await vm.agent.delete_process(container_id)
    return await out


def test_start_finds_crun_state_as_the_agent_expects_and_runs_the_init(
    vm: VM,
    root: str,
) -> None:
    """What the agent's own start reads: crun 1.8.1's status file and exec.fifo."""

    async def scenario() -> tuple[str, int, str, bytes]:
        await start_guest_container(vm, "look")
        await create(vm, "s1", spec("/bin/sh", "-c", "echo started"))
        out = asyncio.ensure_future(collect(vm.agent.read_output("s1", agent_pb2.STDOUT)))
        before = await guest_output(
            vm, "look1", f"test -p {STATE}/s1/exec.fifo && cat {STATE}/s1/status", "look"
        )
        pid = await vm.agent.start_process("s1")
        assert (await vm.agent.wait_process("s1")).exit_status == 0
        # The init's exit killed the cgroup, "look" with it: a guest container of its
        # own, while crun's state of s1 is still there (until delete).
        after = await guest_output(vm, "look2", f"ls {STATE}/s1")
        await vm.agent.delete_process("s1")
        await remove_container(vm, "look")
        return before, pid, after, await out

    before, pid, after, out = vm.run(scenario())  # type: ignore[misc]
    status = json.loads(before)
    assert status["pid"] == pid and isinstance(status["process-start-time"], int)
    assert "exec.fifo" not in after.split()
    assert out == b"started\n"


def test_start_of_a_container_whose_init_is_gone_fails_in_crun_s_words(
    vm: VM,
    root: str,
) -> None:
    async def scenario() -> TtrpcError:
        await create(vm, "s2", spec("/bin/sleep", "100"))
        await vm.agent.signal_process("s2", signal.SIGKILL, False)
        await vm.agent.wait_process("s2")
        try:
            await vm.agent.start_process("s2")
        except TtrpcError as error:
            return error
        finally:
            await vm.agent.delete_process("s2")
        raise AssertionError("start succeeded")

    error = vm.run(scenario())
    assert isinstance(error, TtrpcError)
    assert "crun start failed" in error.message and "not running" in error.message


def test_container_processes_keep_address_space_randomization(
    vm: VM,
    root: str,
) -> None:
    """crun runs with ADDR_NO_RANDOMIZE; the init and an exec must not inherit it."""

    async def scenario() -> list[str]:
        layouts = [
            (await run_container(vm, f"r{n}", "/bin/sh", "-c", SHOW_LAYOUT)).decode()
            for n in range(2)
        ]
        await create(vm, "r2", spec("/bin/sleep", "100"))
        await vm.agent.start_process("r2")
        process = {"args": ["/bin/sh", "-c", SHOW_LAYOUT], "env": ["PATH=/bin"], "cwd": "/"}
        await vm.agent.create_process(
            agent_pb2.CreateProcessRequest(
                id="r2-exec",
                container_id="r2",
                stdout=True,
                oci_json=json.dumps(process).encode(),
            )
        )
        out = asyncio.ensure_future(collect(vm.agent.read_output("r2-exec", agent_pb2.STDOUT)))
        await vm.agent.start_process("r2-exec")
        assert (await vm.agent.wait_process("r2-exec")).exit_status == 0
        await vm.agent.delete_process("r2-exec")
        await vm.agent.signal_process("r2", signal.SIGKILL, False)
        await vm.agent.wait_process("r2")
        await vm.agent.delete_process("r2")
        return [*layouts, (await out).decode()]

    layouts = vm.run(scenario())
    assert isinstance(layouts, list)
    personalities = [layout.split("\n")[0] for layout in layouts]
    stacks = {layout.split("\n")[1].split()[0] for layout in layouts}
    assert personalities == ["00000000"] * 3, layouts
    assert len(stacks) == 3, layouts  # randomized: a new stack address every time


def test_crun_runs_from_the_agent_s_sealed_copy_without_copying_itself(
    vm: VM,
    root: str,
) -> None:
    """The init crun forks is crun until start: its executable shows which copy ran.
    crun's own copy would be `memfd:crun_cloned…` or a `/tmp/crun.…` bind mount."""

    async def scenario() -> str:
        await start_guest_container(vm, "look")
        await create(vm, "m1", spec("/bin/sleep", "100"))
        try:
            status = json.loads(
                await guest_output(vm, "m1-status", f"cat {STATE}/m1/status", "look")
            )
            return await guest_output(vm, "m1-exe", f"ls -l /proc/{status['pid']}/exe", "look")
        finally:
            await remove_container(vm, "m1")
            await remove_container(vm, "look")

    listing = vm.run(scenario())
    assert isinstance(listing, str)
    assert "/memfd:harpoon-crun" in listing, listing
