"""A real guest through the vfkit backend (harpoon.vmm.vfkit), driven by harpoon's vfkit
test double (harpoon.devenv.vfkit_double: QEMU with a real guest vsock through
vhost-device-vsock, virtiofs through virtiofsd, the console on hvc0): the agent chooses
AF_VSOCK (the VM has no virtio-serial ports), the host connects again until it answers
Hello, the rootfs share is virtiofs, a command's output comes back on the stdio port,
the NIC reaches the host through its gvproxy (-listen-vfkit); stopping leaves no
process behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harpoon.net.gvproxy import DEFAULT_HOST_LOOPBACK
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.bundle import Bundle
from harpoon.shim.container_plan import plan_container
from harpoon.shim.transform.network import GVPROXY_API, user_network
from harpoon.vmm.backend import VfkitBackend
from tests.vm.guests import GUEST_ARCHES, guest_for

if TYPE_CHECKING:
    from tests.vm.conftest import RunInGuest

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vfkit() -> Iterator[str]:
    """The vfkit program $HARPOON_VFKIT names, else harpoon's vfkit double installed as
    a `vfkit` program of this test's."""
    named = os.environ.get("HARPOON_VFKIT")
    if named:
        yield named
        return
    try:
        from harpoon.devenv import vfkit_double
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no vfkit double in this checkout (harpoon.devenv.vfkit_double)")
    with tempfile.TemporaryDirectory(prefix="hp-vfkit-") as directory:
        yield str(vfkit_double.install_wrapper(Path(directory)))


def processes_naming(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


@pytest.mark.parametrize("arch", GUEST_ARCHES)
def test_a_guest_answers_over_vsock_and_runs_a_command(
    arch: str, vfkit: str, guest_process: RunInGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An arm64 guest is what an Apple-silicon Mac runs (the double plays one for an
    # arm64 kernel, refusing it unless it is an uncompressed Image, as vfkit does).
    guest = guest_for(arch)
    monkeypatch.setenv("HARPOON_VFKIT", vfkit)
    backend = VfkitBackend()
    name = f"vfkit-{os.getpid()}-{time.time_ns()}"
    bundle = Bundle(Path("/nonexistent"), {"process": {"args": ["sh"]}})
    plan = plan_container("hp-test", name, bundle, guest, backend, templates=False).launch
    assert [share.fs for share in plan.config.shares] == ["virtiofs"]
    sandbox = Sandbox(plan, backend)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nfrom host\n")
        await writer.drain()
        writer.close()

    async def scenario() -> list[tuple[int, bytes, bytes]]:
        host = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = host.sockets[0].getsockname()[1]
        try:
            await sandbox.start()
            assert sandbox.agent is not None
            ran = [
                await asyncio.wait_for(
                    guest_process(sandbox.agent, "cmdline", "cat", "/proc/cmdline"), 120
                )
            ]
            # The NIC: vfkit's unixgram to a gvproxy of the VM's own (-listen-vfkit),
            # which NATs the host's loopback at DEFAULT_HOST_LOOPBACK.
            nic = plan.config.nics[0]
            await sandbox.configure_network("", user_network(nic.mac), block_tcp=GVPROXY_API)
            url = f"http://{DEFAULT_HOST_LOOPBACK}:{port}/"
            ran.append(
                await asyncio.wait_for(
                    guest_process(sandbox.agent, "wget", "wget", "-q", "-O", "-", url), 120
                )
            )
            return ran
        finally:
            console = sandbox.vm.console_tail() if sandbox.vm is not None else ""
            await sandbox.stop()
            host.close()
            print(f"boot {sandbox.boot_seconds:.2f} s; console:\n{console}")

    (status, out, err), fetched = asyncio.run(scenario())
    assert (status, err) == (0, b"")
    assert b"console=hvc0" in out.split()  # the vfkit backend's kernel command line
    assert fetched == (0, b"from host\n", b"")
    assert sandbox.hello is not None and sandbox.hello.agent_version
    console = (plan.config.state_dir / "console.log").read_text(errors="replace")
    assert "serving vsock ports 1025 and 1026" in console
    assert processes_naming(str(plan.config.state_dir)) == []  # vfkit, QEMU, helpers
    shutil.rmtree(plan.config.state_dir, ignore_errors=True)
