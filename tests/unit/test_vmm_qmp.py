"""QMP: the sans-IO line protocol fed bytes, and the asyncio client against a real QEMU."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harpoon.vmm.qmp import Event, Greeting, QmpClient, QmpError, QmpProtocol, Reply

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
    """Greeting, capabilities, a command, an error, an event, and QEMU going away."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("no qemu-system-x86_64")

    async def scenario(socket_path: str, process: subprocess.Popen[bytes]) -> None:
        # QEMU binds its socket a moment before it listens on it (as QemuVM retries).
        for _ in range(500):
            try:
                client = await QmpClient.connect(socket_path)
                break
            except ConnectionRefusedError:
                assert process.poll() is None
                await asyncio.sleep(0.01)
        else:
            raise AssertionError("QEMU never listened on its QMP socket")
        assert client.greeting is not None and client.greeting.version["qemu"]["major"] >= 7
        assert (await client.execute("query-status"))["status"] == "prelaunch"
        with pytest.raises(QmpError, match="CommandNotFound"):
            await client.execute("no-such-command")
        await client.execute("cont")
        await client.execute("stop")
        assert (await client.next_event("STOP", timeout=5)).name == "STOP"
        assert [e.name for e in client.take_events()] == ["RESUME"]
        await client.execute("quit")
        await asyncio.get_running_loop().run_in_executor(None, process.wait)
        with pytest.raises(QmpError, match="QMP query-status: "):
            await client.execute("query-status")
        await client.close()

    with tempfile.TemporaryDirectory(prefix="hp-qmp-") as directory:
        socket_path = str(Path(directory, "qmp.sock"))
        argv = [qemu, "-M", "microvm", "-S", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{socket_path},server=on,wait=off"]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while not Path(socket_path).exists():
                assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
                time.sleep(0.01)
            asyncio.run(scenario(socket_path, process))
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
