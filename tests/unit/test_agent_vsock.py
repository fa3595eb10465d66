"""The agent's host channel over AF_VSOCK (harpoon.agent.vsock, harpoon.agent.main): which
transport a VM offers, read from a fake sysfs, and the listeners serving ttrpc. Nothing
below the listener depends on its family, so AF_UNIX listeners stand in for AF_VSOCK
(a real guest's is tests/vm/test_vfkit.py's)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harpoon.agent import boot, channel, main, modules, vsock
from harpoon.api.names import AGENT_PORT_NAME, AGENT_VSOCK_PORT, STDIO_VSOCK_PORT
from harpoon.ttrpc import CallContext, Client, Server

pytestmark = pytest.mark.timeout(30)

SVC = "test.v1.Agent"
SRC = Path(__file__).resolve().parents[2] / "src"


def sysfs(tmp_path: Path, ports: dict[str, str], devices: dict[str, str]) -> None:
    """A /sys/class/virtio-ports (port -> name) and /sys/bus/virtio/devices (device ->
    its virtio id), as the agent reads them."""
    ports_dir, devices_dir = tmp_path / "virtio-ports", tmp_path / "devices"
    for port, name in ports.items():
        (ports_dir / port).mkdir(parents=True)
        (ports_dir / port / "name").write_text(f"{name}\n")
    devices_dir.mkdir()
    for device, virtio_id in devices.items():
        (devices_dir / device).mkdir()
        (devices_dir / device / "device").write_text(f"{virtio_id}\n")


@pytest.fixture
def fake_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(channel, "PORTS_DIR", str(tmp_path / "virtio-ports"))
    monkeypatch.setattr(boot, "VIRTIO_DEVICES_DIR", str(tmp_path / "devices"))
    return tmp_path


CONSOLE = "0x0003"  # virtio console (QEMU's virtio-serial; vfkit's hvc0)


@pytest.mark.parametrize(
    ("ports", "devices", "expected"),
    [
        # QEMU: the named ports (and no vsock device).
        (
            {"vport0p1": AGENT_PORT_NAME, "vport0p2": "harpoon.stdio"},
            {"virtio0": CONSOLE},
            "virtio-serial",
        ),
        # vfkit: a console whose one port has no name, and a vsock device.
        ({"vport0p0": ""}, {"virtio0": CONSOLE, "virtio1": vsock.VIRTIO_ID_VSOCK}, "vsock"),
        # Both: the ports, as before vsock existed.
        ({"vport0p1": AGENT_PORT_NAME}, {"virtio1": vsock.VIRTIO_ID_VSOCK}, "virtio-serial"),
        # Neither yet: the ports, which serve_port waits for (and names if they never come).
        ({}, {"virtio0": CONSOLE}, "virtio-serial"),
    ],
)
def test_the_transport_is_what_the_vm_offers(
    fake_sysfs: Path, ports: dict[str, str], devices: dict[str, str], expected: str
) -> None:
    sysfs(fake_sysfs, ports, devices)
    assert main.transport() == expected


def test_a_vsock_device_is_found_by_its_virtio_id(tmp_path: Path) -> None:
    sysfs(tmp_path, {}, {"virtio0": "0x0002", "virtio3": "0x0013"})
    assert vsock.has_vsock_device(str(tmp_path / "devices"))
    assert not vsock.has_vsock_device(str(tmp_path / "missing"))


def test_the_vsock_modules_are_loaded_with_their_dependencies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the guest image's map lists them (harpoon.guest.build: modules.json).
    base = "/lib/modules/6.1/kernel/net/vmw_vsock"
    module_map = {
        vsock.TRANSPORT_MODULE: [
            f"{base}/vsock.ko",
            f"{base}/vmw_vsock_virtio_transport_common.ko",
            f"{base}/vmw_vsock_virtio_transport.ko",
        ]
    }
    loaded: list[str] = []
    monkeypatch.setattr(modules.linux, "load_module", lambda path: loaded.append(path) or True)
    modules.load(vsock.TRANSPORT_MODULE, module_map, sys_root=str(tmp_path))
    assert loaded == module_map[vsock.TRANSPORT_MODULE]


def agent_server(calls: list[str]) -> Server:
    server = Server()

    async def hello(payload: bytes, ctx: CallContext) -> bytes:
        calls.append(payload.decode())
        return b"hello " + payload

    server.register_unary(SVC, "Hello", hello)
    return server


def test_both_listeners_are_bound_before_either_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the host has Hello answered on the agent port, the stdio port listens: the
    host connects it then and only then (harpoon.sandbox.agent_client)."""
    bound: list[int] = []

    def listen_vsock(port: int) -> socket.socket:
        bound.append(port)
        return vsock.listen(socket.AF_UNIX, str(tmp_path / f"{port}.sock"))

    monkeypatch.setattr(vsock, "listen_vsock", listen_vsock)
    monkeypatch.setattr(vsock, "load_transport", lambda: bound.append(0))

    async def scenario() -> None:
        calls: list[str] = []
        server = agent_server(calls)
        serving = asyncio.ensure_future(main.serve_vsock(server))
        while len(bound) < 3:
            await asyncio.sleep(0.001)
        agent = await Client.connect_unix(str(tmp_path / f"{AGENT_VSOCK_PORT}.sock"))
        assert await agent.call(SVC, "Hello", b"agent") == b"hello agent"
        stdio = await Client.connect_unix(str(tmp_path / f"{STDIO_VSOCK_PORT}.sock"))
        assert await stdio.call(SVC, "Hello", b"stdio") == b"hello stdio"
        await agent.close()
        await stdio.close()
        await server.close()
        await asyncio.wait_for(serving, 5)

    asyncio.run(scenario())
    # The transport's modules first, then both ports, before anything was served.
    assert bound == [0, AGENT_VSOCK_PORT, STDIO_VSOCK_PORT]


def test_a_second_connection_is_served_while_the_first_is_open_and_outlives_it(
    tmp_path: Path,
) -> None:
    """The host reconnects after a drop: the new connection is served at once, and the
    old one ends when its end is closed (vfkit closes the guest's as the host's goes)."""

    async def scenario() -> None:
        calls: list[str] = []
        server = agent_server(calls)
        path = str(tmp_path / "agent.sock")
        listener = vsock.listen(socket.AF_UNIX, path)
        serving = asyncio.ensure_future(vsock.serve(server, [listener]))
        first = await Client.connect_unix(path)
        assert await first.call(SVC, "Hello", b"1") == b"hello 1"
        second = await Client.connect_unix(path)
        assert await second.call(SVC, "Hello", b"2") == b"hello 2"
        await first.close()
        assert await second.call(SVC, "Hello", b"3") == b"hello 3"
        await second.close()
        await server.close()
        await asyncio.wait_for(serving, 5)
        assert listener.fileno() == -1  # serve() closed its listeners as it ended
        assert calls == ["1", "2", "3"]

    asyncio.run(scenario())


def test_pid_1_without_standard_descriptors_gets_the_console_as_them(tmp_path: Path) -> None:
    """A VM whose only console is a virtio console (vfkit's hvc0) starts init without
    descriptors 0-2: boot.open_console gives it the console once its module is loaded."""
    console = tmp_path / "console"
    console.write_text("")
    script = (
        "import sys\n"
        "from harpoon.agent import boot\n"
        "assert sys.stderr is None, sys.stderr\n"
        f"boot.open_console({str(console)!r})\n"
        "print('to stdout', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "import os\n"
        "assert all(os.get_inheritable(fd) for fd in (0, 1, 2))\n"
    )

    def close_standard_descriptors() -> None:
        for fd in (0, 1, 2):
            os.close(fd)

    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        preexec_fn=close_standard_descriptors,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0
    assert console.read_text() == "to stdout\nto stderr\n"


def test_pid_1_with_a_console_keeps_its_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    monkeypatch.setattr(boot.os, "open", lambda *args: opened.append(args[0]) or -1)
    boot.open_console(str(tmp_path / "console"))
    assert opened == []
