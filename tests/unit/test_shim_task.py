"""The Task service (harpoon.shim.task) driven as containerd drives it: Create, Start,
Exec, Kill, Delete, Wait, State and Shutdown, against fake VMs whose guest is the real
agent service, served in this process over ttrpc on the VM's two sockets, running the
container's processes with a fake crun (tests/unit/fake_vm.py, tests/unit/fake_crun.py).

Everything between containerd's request and crun is real: the transformers' plan and
host work (the rootfs is really bind-mounted into the VM's share), the sandbox and its
agent client, ttrpc both ways, the agent's process table, its crun commands and the
exec.fifo start. The host's run directory is a temporary one (paths.RUN_DIR), and
nothing outside it and the guest's directories is touched (see fake_vm).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from harpoon import linux
from harpoon.api.containerd.task.v2 import shim_pb2 as task
from harpoon.api.containerd.types import mount_pb2
from harpoon.api.containerd.types import task_pb2 as types
from harpoon.errdefs import FailedPrecondition, InvalidArgument, NotFound
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.sandbox import SandboxStarter
from harpoon.shim import paths, serve
from harpoon.shim.hooks import HookFailed
from harpoon.shim.serve import TASK_SERVICE_NAMES, exit_when_abandoned
from harpoon.shim.task import TaskService
from harpoon.shim.transform import PIPELINE
from harpoon.ttrpc.client import Client
from harpoon.ttrpc.server import CallContext, Server
from harpoon.ttrpc.service import register_service
from harpoon.ttrpc.status import TtrpcError
from harpoon.vmm.base import VMError
from tests.task_driver import ID, NAMESPACE, SIGKILLED, RecordingPublisher, Shim
from tests.unit.fake_vm import CRUN_FAIL_ENV, FakeBackend, FakeGuest

IMAGE_TEXT = "from the image\n"
# Host programs the container runs (no namespaces: the fake crun runs them on the host).
IMAGE_PROGRAMS = ("sh", "sleep", "cat")


# -- the host: a temporary run directory, a fake guest, containerd's bundle ----------


@dataclass
class Host:
    base: Path
    """Everything of a test's is under it: run dir, bundle, image, the guest's dirs."""
    run_dir: Path
    image: Path
    """A root filesystem: links to host programs, and a file of its own."""
    bundle: Path
    guest: FakeGuest
    backend: FakeBackend


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    # Short: the VM's sockets are under it, and a unix socket's path has 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    run_dir = base / "run"
    monkeypatch.setattr(paths, "RUN_DIR", str(run_dir))
    monkeypatch.setenv("HARPOON_TEMPLATES", "off")
    image = base / "image"
    (image / "bin").mkdir(parents=True)
    for program in IMAGE_PROGRAMS:
        found = shutil.which(program)
        assert found is not None, f"the host has no {program}"
        (image / "bin" / program).symlink_to(found)
    (image / "hello.txt").write_text(IMAGE_TEXT)
    bundle = base / "bundle"
    bundle.mkdir()
    guest = FakeGuest(base / "guest", monkeypatch)
    try:
        yield Host(base, run_dir, image, bundle, guest, FakeBackend(guest))
    finally:
        linux.unmount_all(str(base))  # only if a test failed half-way
        shutil.rmtree(base)


def write_config(host: Host, args: list[str], root: str | None = None) -> None:
    """containerd's config.json: args run in root (the image itself unless given)."""
    spec = {
        "ociVersion": "1.1.0",
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": root or str(host.image)},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    }
    (host.bundle / "config.json").write_text(json.dumps(spec))


def read_all(fd: int) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    return data


def make_fifo(path: Path) -> int:
    """A FIFO as containerd makes it, with containerd's read end open."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


# -- the shim: the Task service and what it publishes --------------------------------


def guest_image() -> GuestImage:
    return GuestImage("amd64", Path("/kernel"), Path("/initrd"), "6.1.0", "fake")


def new_service(host: Host, on_shutdown: Callable[[], None] = lambda: None) -> TaskService:
    starter = SandboxStarter(host.backend)
    return TaskService(NAMESPACE, RecordingPublisher(), starter, guest_image, on_shutdown)


@contextlib.asynccontextmanager
async def shim_for(host: Host) -> AsyncIterator[Shim]:
    shim = Shim(new_service(host))
    try:
        yield shim
    finally:
        # A test that failed half-way leaves no VM behind for the next one.
        if shim.service.container is not None:
            await shim.service.container.teardown()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):  # a guard for a hung test, not a step
            await scenario()

    asyncio.run(bounded())


# -- Create, Start, Wait, Delete -----------------------------------------------------


def test_create_start_wait_give_the_exit_status_and_containerd_sees_events_in_order(
    host: Host,
) -> None:
    write_config(host, ["sh", "-c", "exit 7"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            created = await shim.create(host.bundle)
            assert created.pid == os.getpid()  # the VMM's pid stands for the task's
            assert (await shim.start()).pid == created.pid
            assert await shim.wait() == 7
            assert shim.publisher.topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]
            deleted = await shim.delete()
            assert deleted.exit_status == 7
            assert shim.publisher.topics[-1] == "/tasks/delete"
            assert shim.publisher.exits() == [(ID, 7)]
            assert shim.service.container is None
            assert host.guest.hostnames == [os.uname().nodename]
        assert not any(vm.running for vm in host.backend.vms)

    run(scenario)


def test_state_reports_created_running_then_stopped_and_nothing_after_delete(
    host: Host,
) -> None:
    write_config(host, ["sleep", "30"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            state = await shim.state()
            assert (state.status, state.id, state.bundle) == (types.CREATED, ID, str(host.bundle))
            await shim.start()
            assert await shim.status() == (types.RUNNING, 0)
            await shim.kill(signal.SIGKILL)
            await shim.wait()
            assert await shim.status() == (types.STOPPED, SIGKILLED)
            assert (await shim.state()).HasField("exited_at")
            await shim.delete()
            with pytest.raises(NotFound):
                await shim.state()

    run(scenario)


def test_the_init_output_reaches_the_file_containerd_named_and_its_root_is_the_image(
    host: Host,
) -> None:
    write_config(host, ["sh", "-c", "echo hello; cat hello.txt; echo oops >&2"])
    out, err = host.base / "logs" / "out.log", host.base / "logs" / "err.log"

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle, stdout=f"file://{out}", stderr=f"file://{err}")
            await shim.start()
            assert await shim.wait() == 0
            # All of it before the exit was reported: nothing waits for more.
            assert out.read_text() == "hello\n" + IMAGE_TEXT
            assert err.read_text() == "oops\n"
            await shim.delete()

    run(scenario)


def test_the_rootfs_containerd_mounts_is_the_container_root_through_the_vm_share(
    host: Host,
) -> None:
    write_config(host, ["cat", "hello.txt"], root="rootfs")
    out = host.base / "out.log"
    mounts = [mount_pb2.Mount(type="bind", source=str(host.image), options=["rbind", "ro"])]

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle, stdout=f"file://{out}", rootfs=mounts)
            assert linux.mounts_under(str(host.bundle / "rootfs"))  # mounted as runc does
            await shim.start()
            assert await shim.wait() == 0
            await shim.delete()
        assert out.read_text() == IMAGE_TEXT
        assert linux.mounts_under(str(host.base)) == []

    run(scenario)


# -- Exec ------------------------------------------------------------------------------


def test_exec_runs_and_exits_with_its_own_status_before_the_init_exit_is_published(
    host: Host,
) -> None:
    write_config(host, ["sleep", "30"])
    fifo = host.base / "exec-stdout"
    reader = make_fifo(fifo)

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            await shim.start()
            await shim.exec("e1", ["sh", "-c", "echo from the exec; exit 3"], stdout=str(fifo))
            assert await shim.status("e1") == (types.CREATED, 0)
            await shim.start("e1")
            assert await shim.wait("e1") == 3
            assert read_all(reader) == b"from the exec\n"
            assert await shim.status("e1") == (types.STOPPED, 3)
            assert await shim.status() == (types.RUNNING, 0)  # the init lives on
            assert (await shim.delete("e1")).exit_status == 3
            with pytest.raises(NotFound):
                await shim.state("e1")
            await shim.kill(signal.SIGKILL)
            assert await shim.wait() == SIGKILLED
            await shim.delete()
            assert shim.publisher.topics == [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exec-added",
                "/tasks/exec-started",
                "/tasks/exit",
                "/tasks/exit",
                "/tasks/delete",
            ]
            assert shim.publisher.exits() == [("e1", 3), (ID, SIGKILLED)]

    try:
        run(scenario)
    finally:
        os.close(reader)


def test_an_exec_of_a_missing_executable_is_accepted_and_fails_at_start_as_under_runc(
    host: Host,
) -> None:
    write_config(host, ["sleep", "30"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            await shim.start()
            await shim.exec("e1", ["no-such-binary"])
            assert await shim.status("e1") == (types.CREATED, 0)
            with pytest.raises(TtrpcError, match="executable file not found"):
                await shim.start("e1")
            # Stopped with runc's 127, and deletable; the container lives on.
            assert await shim.status("e1") == (types.STOPPED, 127)
            assert (await shim.delete("e1")).exit_status == 127
            assert await shim.status() == (types.RUNNING, 0)
            await shim.kill(signal.SIGKILL)
            assert await shim.wait() == SIGKILLED
            await shim.delete()

    run(scenario)


def test_when_the_init_dies_a_running_exec_dies_with_it_and_its_exit_is_published_first(
    host: Host,
) -> None:
    write_config(host, ["sleep", "30"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            await shim.start()
            await shim.exec("e1", ["sleep", "30"])
            await shim.start("e1")
            await shim.kill(signal.SIGTERM)
            assert await shim.wait() == 128 + signal.SIGTERM
            # The container's cgroup was killed (the agent's doing when the init died).
            assert await shim.wait("e1") == SIGKILLED
            assert shim.publisher.exits() == [("e1", SIGKILLED), (ID, 128 + signal.SIGTERM)]
            await shim.delete("e1")
            await shim.delete()

    run(scenario)


def test_exec_needs_a_running_init_and_an_id_of_its_own(host: Host) -> None:
    write_config(host, ["sleep", "30"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            with pytest.raises(FailedPrecondition):
                await shim.exec("e1", ["sleep", "1"])  # the init is only created
            await shim.start()
            with pytest.raises(InvalidArgument):
                await shim.exec("", ["sleep", "1"])
            await shim.kill(signal.SIGKILL)
            await shim.wait()
            await shim.delete()

    run(scenario)


# -- Kill and Delete -------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1])
def test_kill_delivers_the_signal_and_the_process_dies_with_128_plus_its_number(
    host: Host, signum: int
) -> None:
    write_config(host, ["sleep", "30"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            await shim.start()
            await shim.kill(signum)
            assert await shim.wait() == 128 + signum
            assert shim.publisher.exits() == [(ID, 128 + signum)]
            with pytest.raises(NotFound):
                await shim.kill(signal.SIGKILL)  # runc's answer for a finished process
            await shim.delete()

    run(scenario)


def test_delete_of_a_running_process_is_refused_and_of_a_stopped_one_returns_its_status(
    host: Host,
) -> None:
    write_config(host, ["sleep", "30"])

    async def scenario() -> None:
        async with shim_for(host) as shim:
            await shim.create(host.bundle)
            await shim.start()
            await shim.exec("e1", ["sleep", "30"])
            await shim.start("e1")
            for exec_id in ("e1", ""):
                with pytest.raises(FailedPrecondition):
                    await shim.delete(exec_id)
            assert await shim.status() == (types.RUNNING, 0)
            assert await shim.status("e1") == (types.RUNNING, 0)
            await shim.kill(signal.SIGKILL, "e1")
            assert await shim.wait("e1") == SIGKILLED
            assert (await shim.delete("e1")).exit_status == SIGKILLED
            await shim.kill(signal.SIGTERM)
            await shim.wait()
            deleted = await shim.delete()
            assert (deleted.exit_status, deleted.pid) == (128 + signal.SIGTERM, os.getpid())
            assert deleted.HasField("exited_at")

    run(scenario)


# -- Create's rollback -----------------------------------------------------------------


class InjectedFailure(Exception):
    """A step of Create failing, as the test asks."""


def fail_after(step: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """step, done, then failing: what it did must be undone by Create's rollback."""

    async def failing(*args: Any) -> None:
        await step(*args)
        raise InjectedFailure(f"{step.__qualname__} failed as the test asked")

    return failing


@dataclass(frozen=True)
class Failure:
    name: str
    arm: Callable[[Host, pytest.MonkeyPatch], None]
    error: type[BaseException]
    bad_stderr: bool = False
    """containerd names a stderr that cannot be opened (stdout, a file, is opened first)."""

    def __str__(self) -> str:
        return self.name


def _request_alone(host: Host, mp: pytest.MonkeyPatch) -> None:
    """The request itself fails the step (bad_stderr): nothing to arm."""


def _fail_transformer(step: str, index: int) -> Callable[[Host, pytest.MonkeyPatch], None]:
    def arm(host: Host, mp: pytest.MonkeyPatch) -> None:
        transformer = PIPELINE[index]
        mp.setattr(transformer, step, fail_after(getattr(transformer, step)))

    return arm


def _fail_vm_start(host: Host, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(host.backend, "fail_start", True)


def _fail_share_mount(host: Host, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(host.guest, "fail_mount", True)


def _fail_crun_create(host: Host, mp: pytest.MonkeyPatch) -> None:
    mp.setenv(CRUN_FAIL_ENV, "create")


def _fail_missing_executable(host: Host, mp: pytest.MonkeyPatch) -> None:
    write_config(host, ["no-such-program"], root="rootfs")


FAILURES = [
    Failure("opening stdio", _request_alone, InvalidArgument, bad_stderr=True),
    *(
        Failure(f"{type(t).__name__}.before_vm", _fail_transformer("before_vm", i), InjectedFailure)
        for i, t in enumerate(PIPELINE)
    ),
    Failure("the VM's start", _fail_vm_start, VMError),
    Failure("the sandbox's share mount", _fail_share_mount, TtrpcError),
    *(
        Failure(f"{type(t).__name__}.with_vm", _fail_transformer("with_vm", i), InjectedFailure)
        for i, t in enumerate(PIPELINE)
    ),
    Failure("crun create in the agent", _fail_crun_create, TtrpcError),
    Failure("the agent finding no executable", _fail_missing_executable, TtrpcError),
]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def pending_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def assert_nothing_left(host: Host, service: TaskService, fds: set[str]) -> None:
    assert service.container is None
    assert not any(vm.running for vm in host.backend.vms)
    sockets = [p for p in host.base.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
    assert sockets == []
    assert entries(host.run_dir / "vm") == []  # no VM state directory
    assert entries(host.run_dir / "share") == []  # no rootfs share
    assert linux.mounts_under(str(host.base)) == []
    assert open_fds() == fds
    assert pending_tasks() == set()
    assert host.guest.container_pids() == []


@pytest.mark.parametrize("failure", FAILURES, ids=str)
def test_a_failure_at_any_step_of_create_leaves_nothing_and_create_can_be_asked_again(
    host: Host, failure: Failure
) -> None:
    # With containerd's rootfs mounts: the most Create does on the host.
    write_config(host, ["sh", "-c", "exit 5"], root="rootfs")
    mounts = [mount_pb2.Mount(type="bind", source=str(host.image), options=["rbind"])]
    stdout = f"file://{host.base / 'out.log'}"  # opened by every Create

    async def scenario() -> None:
        async with shim_for(host) as shim:
            fds = open_fds()
            with pytest.MonkeyPatch.context() as mp:
                failure.arm(host, mp)
                stderr = "bogus://stderr" if failure.bad_stderr else ""
                with pytest.raises(failure.error):
                    await shim.create(host.bundle, stdout, stderr, rootfs=mounts)
            assert_nothing_left(host, shim.service, fds)
            assert shim.publisher.events == []
            write_config(host, ["sh", "-c", "exit 5"], root="rootfs")
            await shim.create(host.bundle, stdout, rootfs=mounts)
            await shim.start()
            assert await shim.wait() == 5
            await shim.delete()
            assert shim.publisher.topics[0] == "/tasks/create"
            assert_nothing_left(host, shim.service, fds)

    run(scenario)


# -- Shutdown ----------------------------------------------------------------------------


class ShutdownBeforeAnswering(TaskService):
    """A Shutdown that goes before its answer is written: what the test must catch."""

    async def Shutdown(self, request: task.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        self.on_shutdown()
        return empty_pb2.Empty()


async def shutdown_over_ttrpc(host: Host, service_type: type[TaskService]) -> bool:
    """Serves the Task service on a unix socket with a real ttrpc Server, as the daemon
    does, whose on_shutdown ends the daemon at once: its connections are dropped with
    whatever they still hold (the process exits). Whether a real ttrpc client got
    Shutdown's answer."""
    server = Server()
    connections: list[asyncio.StreamWriter] = []
    stopped = asyncio.Event()

    def exit_now() -> None:
        for writer in connections:
            writer.transport.abort()
        stopped.set()

    service = service_type(
        NAMESPACE, RecordingPublisher(), SandboxStarter(host.backend), guest_image, exit_now
    )
    register_service(
        server, task.DESCRIPTOR.services_by_name["Task"], service, names=TASK_SERVICE_NAMES
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await server.serve_connection(reader, writer)

    path = host.base / "shim.sock"
    listener = await asyncio.start_unix_server(serve, path=str(path))
    client = await Client.connect_unix(str(path))
    try:
        request = task.ShutdownRequest(id=ID).SerializeToString()
        try:
            answer = await client.call(TASK_SERVICE_NAMES[1], "Shutdown", request)
        except (TtrpcError, ConnectionError, OSError, EOFError):
            return False
        empty_pb2.Empty().ParseFromString(answer)
        await stopped.wait()  # and the daemon did go
        return True
    finally:
        await client.close()
        await server.close()
        listener.close()
        await listener.wait_closed()


def test_shutdown_answer_reaches_the_client_before_the_daemon_exits(host: Host) -> None:
    async def scenario() -> None:
        assert await shutdown_over_ttrpc(host, TaskService)

    run(scenario)


def test_a_shutdown_that_exits_before_answering_loses_its_answer(host: Host) -> None:
    """The control for the test above: it would fail without after_reply."""

    async def scenario() -> None:
        assert not await shutdown_over_ttrpc(host, ShutdownBeforeAnswering)

    run(scenario)


@pytest.mark.parametrize("delete_first", [True, False])
def test_a_daemon_whose_container_is_deleted_exits_when_containerd_goes_without_shutdown(
    host: Host, delete_first: bool
) -> None:
    """containerd lost (a restart, a broken connection) after the container's Delete sends
    no Shutdown: the daemon exits once no client is connected. One whose container
    still exists stays, for a restarted containerd to reconnect to."""
    write_config(host, ["sh", "-c", "exit 3"])

    async def scenario() -> None:
        stopped = asyncio.Event()
        service = new_service(host, stopped.set)
        server = Server()
        register_service(
            server, task.DESCRIPTOR.services_by_name["Task"], service, names=TASK_SERVICE_NAMES
        )
        exit_when_abandoned(server, service, stopped.set)
        path = host.base / "shim.sock"
        listener = await asyncio.start_unix_server(server.serve_connection, path=str(path))
        method = TASK_SERVICE_NAMES[1]
        try:
            client = await Client.connect_unix(str(path))
            create = task.CreateTaskRequest(id=ID, bundle=str(host.bundle))
            await client.call(method, "Create", create.SerializeToString())
            await client.call(method, "Start", task.StartRequest(id=ID).SerializeToString())
            await client.call(method, "Wait", task.WaitRequest(id=ID).SerializeToString())
            if delete_first:
                await client.call(method, "Delete", task.DeleteRequest(id=ID).SerializeToString())
            await client.close()
            if delete_first:
                await stopped.wait()
            else:
                # A bounded window to see that it does NOT exit: its container exists.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), 0.5)
                assert service.container is not None
        finally:
            if service.container is not None:
                await service.container.teardown()
            await server.close()
            listener.close()
            await listener.wait_closed()

    run(scenario)


@pytest.mark.parametrize("created", [False, True])
def test_a_daemon_never_sent_create_exits_on_its_own_and_one_with_a_container_stays(
    host: Host, monkeypatch: pytest.MonkeyPatch, created: bool
) -> None:
    """containerd died between `start` and Create: restarted, it only reconnects, and
    (1.6) keeps the shim as a task whose State fails; no Create ever comes."""
    write_config(host, ["sleep", "30"])
    monkeypatch.setattr(serve, "UNUSED_EXIT_S", 0.2)

    async def scenario() -> None:
        stopped = asyncio.Event()
        async with shim_for(host) as shim:
            if created:
                await shim.create(host.bundle)
            serve.exit_when_never_used(shim.service, stopped.set)
            if created:
                with pytest.raises(TimeoutError):  # a bounded window to see it stays
                    await asyncio.wait_for(stopped.wait(), 0.6)
            else:
                await stopped.wait()

    run(scenario)


# -- OCI hooks ---------------------------------------------------------------------------


def hook(host: Host, name: str, exit_status: int = 0) -> dict[str, object]:
    """A hook that appends its name and the State it read to host.base/hooks.log."""
    script = host.base / f"{name}.sh"
    log = host.base / "hooks.log"
    script.write_text(
        f'#!/bin/sh\n{{ echo {name}; cat; echo; }} >> {log}\necho "{name} says no" >&2\n'
        f"exit {exit_status}\n"
    )
    script.chmod(0o755)
    return {"path": str(script), "args": [name]}


def hook_log(host: Host) -> list[tuple[str, dict[str, Any]]]:
    lines = (host.base / "hooks.log").read_text().splitlines()
    return [(lines[i], json.loads(lines[i + 1])) for i in range(0, len(lines), 2)]


def with_hooks(host: Host, hooks: dict[str, list[dict[str, object]]]) -> None:
    spec = json.loads((host.bundle / "config.json").read_text())
    spec["hooks"] = hooks
    spec["annotations"] = {"nerdctl/name": "web"}
    (host.bundle / "config.json").write_text(json.dumps(spec))


def test_host_hooks_run_where_runc_runs_them_with_the_state_on_stdin(host: Host) -> None:
    write_config(host, ["sh", "-c", "exit 0"])
    with_hooks(host, {
        "prestart": [hook(host, "prestart")],
        "createRuntime": [hook(host, "createRuntime")],
        "poststart": [hook(host, "poststart")],
        "poststop": [hook(host, "poststop")],
    })  # fmt: skip

    async def scenario() -> None:
        async with shim_for(host) as shim:
            created = await shim.create(host.bundle)
            assert [name for name, _ in hook_log(host)] == ["prestart", "createRuntime"]
            await shim.start()
            assert await shim.wait() == 0
            await shim.delete()
            log = hook_log(host)
            assert [name for name, _ in log] == [
                "prestart",
                "createRuntime",
                "poststart",
                "poststop",
            ]
            states = dict(log)
            assert states["createRuntime"]["pid"] == created.pid
            assert states["createRuntime"]["status"] == "creating"
            assert states["poststart"]["status"] == "running"
            assert states["poststop"]["status"] == "stopped"
            assert "pid" not in states["poststop"]
            for _, state in log:
                assert state["id"] == ID and state["bundle"] == str(host.bundle)
                assert state["annotations"]["nerdctl/name"] == "web"

    run(scenario)


def test_a_failing_create_runtime_hook_fails_create_runs_poststop_and_leaves_nothing(
    host: Host,
) -> None:
    write_config(host, ["sh", "-c", "exit 0"])
    with_hooks(host, {
        "createRuntime": [hook(host, "createRuntime", exit_status=3)],
        "poststop": [hook(host, "poststop")],
    })  # fmt: skip

    async def scenario() -> None:
        async with shim_for(host) as shim:
            fds = open_fds()
            with pytest.raises(HookFailed, match=r"createRuntime hook #0.*exit status 3.*says no"):
                await shim.create(host.bundle)
            assert [name for name, _ in hook_log(host)] == ["createRuntime", "poststop"]
            assert shim.publisher.events == []
            assert_nothing_left(host, shim.service, fds)

    run(scenario)
