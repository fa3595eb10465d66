"""What the VM tests share: the guest image, a sandbox started as the shim starts one,
and running a command in the guest through the agent, as the tests (not containerd) do.

The agent runs only container processes, under crun. A test's own command runs in a
*guest container*: its root is the guest's own `/`, it has no namespaces, no mounts and
every capability, so it sees the guest as the agent does (its mounts, crun's state, its
pids) and acts as root there; crun still creates, starts and reaps it. Every container
in the guest shares its one cgroup, which the agent kills whenever a container's init
exits: a command that must run beside another container is an exec into a guest
container started before it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.names import CONTAINER_CGROUPS_PATH
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.plan import plan_launch
from harpoon.sandbox.sandbox import Sandbox
from harpoon.shim.bundle import Bundle
from harpoon.shim.container_plan import ContainerPlan, plan_container
from harpoon.vmm.backend import QemuBackend, host_arch

RunInGuest = Callable[..., Awaitable[tuple[int, bytes, bytes]]]
GuestRequest = Callable[..., agent_pb2.CreateProcessRequest]
StartSandbox = Callable[..., contextlib.AbstractContextManager["StartedSandbox"]]
RUN_TIMEOUT_S = 120.0
GUEST_ENV = ["PATH=/bin:/usr/bin"]
# Every capability Linux 6.1 has: the command acts as root in the guest, as the agent.
ALL_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]  # fmt: skip


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    from harpoon.guest import find_guest

    try:
        return find_guest(host_arch())
    except Exception as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no guest image: {error}")


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def guest_request(
    process_id: str,
    *args: str,
    container_id: str = "",
    stdout: bool = False,
    stderr: bool = False,
    mounts: list[dict[str, object]] | None = None,
    root: str = "/",
) -> agent_pb2.CreateProcessRequest:
    """The agent's request for args as a guest container's init or, with container_id,
    as an exec into that (guest) container. With mounts, the container has them, in a
    mount namespace of its own, and its root is `root` (crun cannot move the guest's
    own root, its initramfs: a mount of it elsewhere)."""
    process = {
        "args": list(args),
        "env": GUEST_ENV,
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "capabilities": {key: ALL_CAPABILITIES for key in ("bounding", "effective", "permitted")},
    }
    if container_id:
        document: dict[str, object] = process
    else:
        # What the host's guest spec always carries (harpoon.shim.transform.guest_runtime).
        linux: dict[str, object] = {
            "cgroupsPath": CONTAINER_CGROUPS_PATH,
            "personality": {"domain": "LINUX"},
        }
        if mounts:
            linux["namespaces"] = [{"type": "mount"}]
        document = {
            "ociVersion": "1.0.2",
            "process": process,
            "root": {"path": root},
            "mounts": mounts or [],
            "linux": linux,
        }
    return agent_pb2.CreateProcessRequest(
        id=process_id,
        container_init=not container_id,
        container_id=container_id,
        oci_json=json.dumps(document).encode(),
        stdout=stdout,
        stderr=stderr,
    )


async def run_in_guest(
    agent: AgentClient,
    process_id: str,
    *args: str,
    container_id: str = "",
    mounts: list[dict[str, object]] | None = None,
    root: str = "/",
) -> tuple[int, bytes, bytes]:
    """Runs args in a guest container of its own (with mounts and root, if given:
    guest_request), or, with container_id, as an exec into that guest container, to its
    exit: status, stdout, stderr."""
    request = guest_request(
        process_id,
        *args,
        container_id=container_id,
        stdout=True,
        stderr=True,
        mounts=mounts,
        root=root,
    )
    await agent.create_process(request)
    out = asyncio.ensure_future(collect(agent.read_output(process_id, agent_pb2.STDOUT)))
    err = asyncio.ensure_future(collect(agent.read_output(process_id, agent_pb2.STDERR)))
    await agent.start_process(process_id)
    status = await agent.wait_process(process_id)
    await agent.delete_process(process_id)
    return status.exit_status, await out, await err


@pytest.fixture(scope="session")
def guest_requests() -> GuestRequest:
    """guest_request, for test modules (conftest is not imported by name)."""
    return guest_request


@pytest.fixture(scope="session")
def guest_process() -> RunInGuest:
    """run_in_guest, for test modules (conftest is not imported by name)."""
    return run_in_guest


class StartedSandbox:
    """A started sandbox, and the loop that drives it from synchronous tests."""

    def __init__(
        self, sandbox: Sandbox, loop: asyncio.AbstractEventLoop, plan: ContainerPlan
    ) -> None:
        self.sandbox, self.loop, self.plan = sandbox, loop, plan

    def run(self, *args: str) -> tuple[int, bytes, bytes]:
        """run_in_guest, to the process's exit."""
        assert self.sandbox.agent is not None
        running = run_in_guest(self.sandbox.agent, "run", *args)
        return self.loop.run_until_complete(asyncio.wait_for(running, RUN_TIMEOUT_S))

    def console(self) -> str:
        assert self.sandbox.vm is not None
        return self.sandbox.vm.console_tail()


@contextlib.contextmanager
def start_sandbox(
    guest: GuestImage,
    name: str,
    *,
    cpus: int | None = None,
    templates: Literal[False] | None = None,
    spec: dict[str, object] | None = None,
) -> Iterator[StartedSandbox]:
    """A container's sandbox as the shim plans it (harpoon.shim.container_plan: a rootfs
    share) for spec (default: `sh` alone), from a VM template unless templates is False;
    stopped, its state directory removed, on the way out."""
    loop = asyncio.new_event_loop()
    backend = QemuBackend()
    container_id = f"{name}-{os.getpid()}-{time.time_ns()}"
    bundle = Bundle(Path("/nonexistent"), spec or {"process": {"args": ["sh"]}})
    container = plan_container("hp-test", container_id, bundle, guest, backend, templates)
    plan = container.launch
    if cpus is not None:
        plan = plan_launch(replace(plan.config, cpus=cpus), backend, templates, plan.rootfs_share)
    config = plan.config
    sandbox = Sandbox(plan, backend)
    try:
        loop.run_until_complete(sandbox.start())
        yield StartedSandbox(sandbox, loop, container)
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def sandboxes() -> StartSandbox:
    """start_sandbox, for test modules (conftest is not imported by name)."""
    return start_sandbox
