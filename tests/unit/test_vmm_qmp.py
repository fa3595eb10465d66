"""QMP: the sans-IO line protocol fed bytes, the asyncio client and its event listeners
against a fake QEMU (a QMP server answering as each test says) and a real one, and
QemuVM's waits, which take QEMU's events rather than poll."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from harpoon.vmm.base import VMConfig, VMError
from harpoon.vmm.qemu import QemuVM
from harpoon.vmm.qmp import (
    MAX_QUEUED_EVENTS,
    Event,
    EventListener,
    Greeting,
    QmpClient,
    QmpError,
    QmpProtocol,
    Reply,
)

pytestmark = pytest.mark.timeout(30)

GREETING = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": ["oob"]}}\r\n'


def test_greeting_replies_and_events_are_parsed_in_order() -> None:
    protocol = QmpProtocol()
    data = (
        GREETING
        + b'{"return": {}, "id": "hp-1"}\r\n'
        + b'{"timestamp": {"seconds": 1}, "event": "STOP"}\r\n'
        + b'{"error": {"class": "CommandNotFound", "desc": "no such"}, "id": "hp-2"}\r\n'
    )
    messages = protocol.feed(data)
    assert messages == [
        Greeting({"qemu": {"major": 7, "minor": 2}}, ["oob"]),
        Reply("hp-1", {}),
        Event("STOP", {}),
        Reply("hp-2", error_class="CommandNotFound", error="no such"),
    ]
    assert messages[1].ok and not messages[3].ok  # type: ignore[union-attr]


def test_messages_split_anywhere_arrive_whole() -> None:
    protocol = QmpProtocol()
    data = GREETING + b'{"return": {"status": "running"}, "id": "hp-7"}\n'
    messages = []
    for byte in data:
        messages += protocol.feed(bytes([byte]))
    assert [type(m) for m in messages] == [Greeting, Reply]
    assert messages[1] == Reply("hp-7", {"status": "running"})


def test_commands_carry_increasing_ids_and_their_arguments() -> None:
    protocol = QmpProtocol()
    first, line = protocol.command("stop")
    second, line2 = protocol.command("migrate", {"uri": "exec:cat > /x"})
    assert first != second
    assert json.loads(line) == {"execute": "stop", "id": first}
    assert json.loads(line2) == {
        "execute": "migrate",
        "id": second,
        "arguments": {"uri": "exec:cat > /x"},
    }
    assert line.endswith(b"\n") and line.count(b"\n") == 1


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"what": 1}\n'])
def test_garbage_is_a_clear_error(line: bytes) -> None:
    with pytest.raises(QmpError, match="QEMU sent"):
        QmpProtocol().feed(line)


def test_client_drives_a_real_qemu() -> None:
    """Greeting, capabilities, a command, an error, events, and QEMU going away."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("no qemu-system-x86_64")

    async def scenario(socket_path: str, process: subprocess.Popen[bytes]) -> None:
        client = await QmpClient.connect(socket_path)
        assert client.greeting is not None and client.greeting.version["qemu"]["major"] >= 7
        assert (await client.execute("query-status"))["status"] == "prelaunch"
        with pytest.raises(QmpError, match="CommandNotFound"):
            await client.execute("no-such-command")
        with client.listen("STOP", "RESUME") as events:
            await client.execute("cont")
            await client.execute("stop")
            assert [(await events.get()).name for _ in range(2)] == ["RESUME", "STOP"]
        await client.execute("quit")
        await asyncio.get_running_loop().run_in_executor(None, process.wait)
        with pytest.raises(QmpError, match="QMP query-status: "):
            await client.execute("query-status")
        await client.close()

    with tempfile.TemporaryDirectory(prefix="hp-qmp-") as directory:
        socket_path = str(Path(directory, "qmp.sock"))
        # Bound and listening before QEMU starts (QEMU takes the socket as an fd): the
        # client connects at once, with no wait for QEMU to get going.
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(socket_path)
            listener.listen()
            fd = listener.fileno()
            argv = [qemu, "-M", "microvm", "-S", "-nodefaults", "-display", "none",
                    "-chardev", f"socket,id=qmp,fd={fd},server=on,wait=off",
                    "-mon", "chardev=qmp,mode=control"]  # fmt: skip
            process = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(fd,)
            )
        try:
            asyncio.run(asyncio.wait_for(scenario(socket_path, process), 20))
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


# -- events, against a fake QEMU -------------------------------------------------------

Answer = Callable[[dict[str, Any]], Any]


class FakeQemu:
    """A QMP server for one client: greets, answers each command with what `answers`
    returns for it, and sends the events a test emits, in order with the replies (an
    answer that emits sends its events before its reply, as QEMU may)."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.executed: list[tuple[str, dict[str, Any]]] = []
        self._writer: asyncio.StreamWriter | None = None

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self._send({"event": name, "data": data or {}, "timestamp": {"seconds": 1}})

    def hang_up(self) -> None:
        assert self._writer is not None
        self._writer.close()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._writer is not None, "no client is connected"
        self._writer.write(json.dumps(message).encode() + b"\r\n")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._send({"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})
        while line := await reader.readline():
            command = json.loads(line)
            name, arguments = command["execute"], command.get("arguments", {})
            self.executed.append((name, arguments))
            answer = self.answers.get(name, lambda _: {})(arguments)
            self._send({"return": answer, "id": command["id"]})
        writer.close()

    def names(self) -> list[str]:
        return [name for name, _ in self.executed]


@asynccontextmanager
async def fake_qemu_vm(memory_file: Path | None = None) -> AsyncIterator[tuple[FakeQemu, QemuVM]]:
    """A QemuVM whose QMP socket a FakeQemu serves (no QEMU process)."""
    with tempfile.TemporaryDirectory(prefix="hp-qmp-") as directory:
        config = VMConfig(
            name="fake", arch="amd64", kernel=Path("/k"), initrd=Path("/i"),
            state_dir=Path(directory), memory_file=memory_file,
        )  # fmt: skip
        fake = FakeQemu()
        server = await asyncio.start_unix_server(fake.serve, str(config.control_socket))
        vm = QemuVM(config)
        try:
            yield fake, vm
        finally:
            await vm.stop()
            server.close()
            await server.wait_closed()


@asynccontextmanager
async def fake_qemu_client() -> AsyncIterator[tuple[FakeQemu, QmpClient]]:
    async with fake_qemu_vm() as (fake, vm):
        client = await QmpClient.connect(str(vm.config.control_socket))
        try:
            yield fake, client
        finally:
            await client.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=20))


async def still_waiting(task: asyncio.Future[Any], window_s: float = 0.1) -> None:
    """Checks that task has not finished within a short window (that something did NOT
    happen: it must wait for what the test sends next)."""
    done, _ = await asyncio.wait({task}, timeout=window_s)
    assert not done, f"{task} finished without the event it must wait for"


def test_a_listener_gets_the_events_of_its_names_from_when_it_listens_in_order() -> None:
    async def body() -> None:
        async with fake_qemu_client() as (fake, client):
            fake.answers["stop"] = lambda _: fake.emit("STOP")
            await client.execute("stop")  # its STOP came before the reply: nobody listened
            with client.listen("STOP", "RESUME") as events:
                fake.answers["cont"] = lambda _: [fake.emit(n) for n in ("RESUME", "POWERDOWN")]
                await client.execute("cont")
                await client.execute("stop")
                assert [(await events.get()).name for _ in range(2)] == ["RESUME", "STOP"]
                waiting = asyncio.ensure_future(events.get())
                await still_waiting(waiting)
                fake.emit("STOP", {"reason": "x"})
                assert await waiting == Event("STOP", {"reason": "x"})

    run(body)


def test_every_listener_gets_its_own_copy_and_a_finished_one_gets_nothing() -> None:
    async def body() -> None:
        async with fake_qemu_client() as (fake, client):
            with client.listen("STOP") as first, client.listen("STOP") as second:
                with client.listen("STOP") as finished:
                    pass
                fake.emit("STOP")
                assert (await first.get()).name == (await second.get()).name == "STOP"
            waiting = asyncio.ensure_future(finished.get())
            await still_waiting(waiting)
            waiting.cancel()

    run(body)


def test_a_listener_gets_what_came_before_qemu_went_away_then_an_error() -> None:
    async def body() -> None:
        async with fake_qemu_client() as (fake, client):
            with client.listen("MIGRATION") as events:
                fake.emit("MIGRATION", {"status": "completed"})
                fake.hang_up()
                assert (await events.get()).data == {"status": "completed"}
                with pytest.raises(QmpError, match="closed the QMP connection"):
                    await events.get()
            with client.listen("MIGRATION") as late, pytest.raises(QmpError, match="closed"):
                await late.get()

    run(body)


def test_a_listener_left_unread_too_long_fails_instead_of_queueing_without_bound() -> None:
    async def body() -> None:
        listener = EventListener(frozenset({"X"}))
        for index in range(MAX_QUEUED_EVENTS + 1):
            listener.deliver(Event("X", {"n": index}))
        for index in range(MAX_QUEUED_EVENTS):
            assert (await listener.get()).data == {"n": index}
        with pytest.raises(QmpError, match="left unread"):
            await listener.get()

    run(body)


class FakeMigration:
    """The fake's migration: `migrate` sends MIGRATION events for `early` before its
    reply; query-migrate answers `status`, which finish() changes (with its event)."""

    def __init__(self, fake: FakeQemu, status: str, early: tuple[str, ...] = ()) -> None:
        self.fake = fake
        self.status = status
        self.early = early
        fake.answers["migrate"] = self.migrate
        fake.answers["query-migrate"] = lambda _: {"status": self.status, "error-desc": "full"}

    def migrate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        for status in self.early:
            self.fake.emit("MIGRATION", {"status": status})
        return {}

    def finish(self, status: str) -> None:
        self.status = status
        self.fake.emit("MIGRATION", {"status": status})


def test_save_state_returns_on_the_migration_event_with_events_enabled_first() -> None:
    async def body() -> None:
        async with fake_qemu_vm(memory_file=Path("/m")) as (fake, vm):
            migration = FakeMigration(fake, "active", early=("setup", "active"))
            saving = asyncio.ensure_future(vm.save_state(Path("/saved")))
            await still_waiting(saving)
            migration.finish("completed")
            await saving
            names = fake.names()
            assert names.index("migrate-set-capabilities") < names.index("migrate")
            capabilities = fake.executed[names.index("migrate-set-capabilities")][1]
            assert capabilities["capabilities"] == [
                {"capability": "events", "state": True},
                {"capability": "x-ignore-shared", "state": True},
            ]
            # One look at the state once listening; the rest came by event.
            assert names.count("query-migrate") == 1

    run(body)


def test_save_state_sees_a_migration_that_ended_before_its_events_were_read() -> None:
    async def body() -> None:
        async with fake_qemu_vm() as (fake, vm):
            FakeMigration(fake, "completed")  # and no event at all: the query tells
            await vm.save_state(Path("/saved"))
            FakeMigration(fake, "completed", early=("setup", "active", "completed"))
            await vm.save_state(Path("/saved"))

    run(body)


def test_a_failed_migration_raises_with_qemus_reason() -> None:
    async def body() -> None:
        async with fake_qemu_vm() as (fake, vm):
            migration = FakeMigration(fake, "active")
            saving = asyncio.ensure_future(vm.save_state(Path("/saved")))
            await still_waiting(saving)
            migration.finish("failed")
            with pytest.raises(VMError, match="VM fake: migration failed: full"):
                await saving

    run(body)


def test_qemu_gone_during_a_save_is_a_vm_error_naming_the_vm() -> None:
    async def body() -> None:
        async with fake_qemu_vm() as (fake, vm):
            FakeMigration(fake, "active")
            saving = asyncio.ensure_future(vm.save_state(Path("/saved")))
            await still_waiting(saving)
            fake.hang_up()
            with pytest.raises(VMError, match=r"VM fake: .*QMP connection"):
                await saving

    run(body)


class FakePorts:
    """The fake's virtio-serial ports: devices with `device_ids` (QEMU sends
    VSERPORT_CHANGE for those only) whose chardevs are frontend-open if in `open`."""

    def __init__(self, fake: FakeQemu, device_ids: tuple[str, ...], open: set[str]) -> None:
        self.open = open
        fake.answers["qom-list"] = lambda _: (
            [{"name": id, "type": "child<virtserialport>"} for id in device_ids]
            + [{"name": "type", "type": "string"}]
        )
        fake.answers["query-chardev"] = lambda _: [
            {"label": label, "filename": "unix:", "frontend-open": label in self.open}
            for label in ("agent", "stdio", "console")
        ]


def test_the_agent_channel_is_awaited_by_its_ports_events() -> None:
    async def body() -> None:
        async with fake_qemu_vm() as (fake, vm):
            FakePorts(fake, ("agent-port", "stdio-port"), open={"stdio"})
            waiting = asyncio.ensure_future(vm.wait_for_agent_channel(10))
            await still_waiting(waiting)
            fake.emit("VSERPORT_CHANGE", {"id": "other-port", "open": True})
            fake.emit("VSERPORT_CHANGE", {"id": "stdio-port", "open": False})
            fake.emit("VSERPORT_CHANGE", {"id": "agent-port", "open": True})
            await still_waiting(waiting)
            fake.emit("VSERPORT_CHANGE", {"id": "stdio-port", "open": True})
            await waiting
            assert fake.names().count("query-chardev") == 1

    run(body)


def test_ports_the_guest_opened_before_the_wait_need_no_event() -> None:
    async def body() -> None:
        async with fake_qemu_vm() as (fake, vm):
            FakePorts(fake, ("agent-port", "stdio-port"), open={"agent", "stdio"})
            await vm.wait_for_agent_channel(10)

    run(body)


def test_the_agent_channel_wait_ends_in_timeouterror_at_its_deadline() -> None:
    async def body() -> None:
        async with fake_qemu_vm() as (fake, vm):
            FakePorts(fake, ("agent-port", "stdio-port"), open=set())
            with pytest.raises(TimeoutError):
                await vm.wait_for_agent_channel(0.2)

    run(body)
