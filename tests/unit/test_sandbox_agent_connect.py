"""The host's connection to the agent through a VMM that closes connections made before
the guest listens (vfkit: VirtualMachine.agent_waits_for_guest False): connected again
until Hello is answered, then the stdio socket (AgentClient.connect_when_listening,
Sandbox._boot). A fake VMM stands in (tests/unit/fake_vm.py: the real agent service in
this process), and plain sockets for what only a VMM's socket does (a dial that waits)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.names import AGENT_SERVICE
from harpoon.sandbox import agent_client, ports
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.plan import LaunchPlan
from harpoon.sandbox.sandbox import Sandbox
from harpoon.ttrpc import CallContext, Server, TtrpcError
from harpoon.ttrpc.status import Code, ConnectionClosedError
from harpoon.vmm.base import VMConfig
from tests.unit.fake_vm import FakeBackend, FakeGuest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def base() -> Iterator[Path]:
    # Short: unix socket paths have 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def vm_config(base: Path) -> VMConfig:
    return VMConfig(name="c1", arch="amd64", kernel=Path("/k"), initrd=Path("/i"),
                    state_dir=base / "vm")  # fmt: skip


def test_a_sandbox_connects_again_until_the_agent_listens_then_connects_stdio(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FakeBackend(FakeGuest(base / "guest", monkeypatch))
    backend.closed_before_listening = 3  # vfkit's sockets before the agent listens

    async def scenario() -> None:
        sandbox = Sandbox(LaunchPlan(vm_config(base)), backend)
        try:
            await sandbox.start()
            assert sandbox.hello is not None and sandbox.hello.agent_version
            assert sandbox.agent is not None
            # The stdio connection is live: the agent answers on it (no such process).
            with pytest.raises(TtrpcError) as answered:
                async for _ in sandbox.agent.read_output("nothing", agent_pb2.STDOUT):
                    pass
            assert answered.value.code == Code.NOT_FOUND
        finally:
            await sandbox.stop()

    asyncio.run(scenario())
    # Hello on the agent socket until answered; only then the stdio socket, once.
    assert backend.connections == [
        ("agent", "closed"), ("agent", "closed"), ("agent", "closed"),
        ("agent", "served"), ("stdio", "served"),
    ]  # fmt: skip


def test_a_vmm_whose_connections_wait_for_the_guest_is_connected_once(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's path, unchanged: both sockets connected at once, Hello sent on the first."""
    backend = FakeBackend(FakeGuest(base / "guest", monkeypatch))

    async def scenario() -> None:
        sandbox = Sandbox(LaunchPlan(vm_config(base)), backend)
        try:
            await sandbox.start()
        finally:
            await sandbox.stop()

    asyncio.run(scenario())
    assert backend.connections == [("agent", "served"), ("stdio", "served")]


def hello_server() -> Server:
    server = Server()

    async def hello(payload: bytes, ctx: CallContext) -> bytes:
        return agent_pb2.HelloResponse(agent_version="test").SerializeToString()

    server.register_unary(AGENT_SERVICE, "Hello", hello)
    return server


def test_a_connection_left_unanswered_is_given_up_for_another(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VMM whose dial to the guest waits rather than fails holds the first
    connection open and silent: after ATTEMPT_TIMEOUT_S the host tries another."""
    monkeypatch.setattr(agent_client, "ATTEMPT_TIMEOUT_S", 0.2)
    agent_path, stdio_path = base / "agent.sock", base / "stdio.sock"
    server = hello_server()
    held: list[asyncio.StreamWriter] = []

    async def agent_socket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not held:
            held.append(writer)  # the dial that never completes: nothing comes back
            return
        await server.serve_connection(reader, writer)

    async def stdio_socket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.serve_connection(reader, writer)

    async def scenario() -> None:
        agent = await asyncio.start_unix_server(agent_socket, str(agent_path))
        stdio = await asyncio.start_unix_server(stdio_socket, str(stdio_path))
        async with agent, stdio:
            client, hello = await AgentClient.connect_when_listening(
                str(agent_path), str(stdio_path), timeout=10
            )
            assert hello.agent_version == "test"
            await client.close()
            held[0].close()
            await server.close()

    asyncio.run(scenario())
    assert len(held) == 1


def test_a_guest_that_never_listens_fails_once_the_time_is_up(base: Path) -> None:
    agent_path = base / "agent.sock"
    closed = 0

    async def never_listening(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        closed += 1
        writer.close()

    async def scenario() -> None:
        async with await asyncio.start_unix_server(never_listening, str(agent_path)):
            with pytest.raises(ConnectionClosedError):
                await AgentClient.connect_when_listening(
                    str(agent_path), str(base / "stdio.sock"), timeout=0.3
                )

    asyncio.run(scenario())
    assert closed >= 3  # it did try again (every RECONNECT_PAUSE_S)


def test_a_dead_vmms_socket_refuses_and_that_is_the_error(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed vfkit leaves its socket file, which refuses: no retrying for the whole
    timeout (the sandbox's wait on the VMM says how it ended)."""
    import socket

    monkeypatch.setattr(ports, "CONNECT_ATTEMPTS", 2)
    agent_path = base / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(agent_path))  # bound, never listening: as a dead process leaves it

        async def scenario() -> None:
            with pytest.raises(ConnectionRefusedError):
                await AgentClient.connect_when_listening(
                    str(agent_path), str(base / "stdio.sock"), timeout=30
                )

        asyncio.run(asyncio.wait_for(scenario(), 10))
