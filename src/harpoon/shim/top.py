"""`harpoon top`: a container's processes as its VM sees them, in `ps -ef`'s columns.

The host's ps cannot look inside a VM, and containerd's Task.Pids reports the VM's pid
for every process (the host's tools act on host pids), so nerdctl's and docker's `top`
would show QEMU. harpoon's shim answers harpoon.shim.v1.Guest/ListProcesses on its own
socket instead, from the guest agent's /proc (harpoon.agent.ps); the shim's socket is
named in the task's bundle (`address`), under containerd's state directory.

Formatting is separate from asking, and takes the host's clock as an argument: a
process's start is the host's now less its elapsed time in guest ticks (a VM restored
from a template has the guest's wall clock of its save until the agent's Hello).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.shim.v1 import guest_pb2
from harpoon.ttrpc.status import Code, TtrpcError

SERVICE = "harpoon.shim.v1.Guest"
#: Where containerd keeps a runtime v2 task's bundle, under its state directory.
TASK_DIR = "io.containerd.runtime.v2.task"
CALL_TIMEOUT_S = 30.0
HEADER = ("UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD")
SECONDS_PER_DAY = 86400
#: Unix98 pseudo-terminals' majors (devices.txt: 136-143 are /dev/pts/*).
PTS_MAJORS = range(136, 144)
TTY_MAJOR = 4


class TopError(RuntimeError):
    """The container's processes cannot be listed; says why."""


def bundle_dir(state_dir: Path, namespace: str, container_id: str) -> Path:
    return state_dir / TASK_DIR / namespace / container_id


def find_container(state_dir: Path, namespace: str, name: str) -> str:
    """The id of the task `name` is (an id, or a unique prefix of one, as docker's
    short ids are) in containerd's state directory."""
    tasks = state_dir / TASK_DIR / namespace
    if (tasks / name).is_dir():
        return name
    matches = sorted(p.name for p in tasks.glob(f"{name}*") if p.is_dir()) if name else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise TopError(f"{name!r} is the start of several tasks' ids: {', '.join(matches)}")
    raise TopError(f"no running task {name!r} in namespace {namespace!r} (under {tasks})")


def shim_socket(state_dir: Path, namespace: str, container_id: str) -> str:
    """The shim's socket as containerd recorded it in the bundle: `bootstrap.json`
    (2.x) or `address` (1.6, where the shim writes it)."""
    bundle = bundle_dir(state_dir, namespace, container_id)
    try:
        address = json.loads((bundle / "bootstrap.json").read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError):
        try:
            address = (bundle / "address").read_text().strip()
        except OSError as error:
            raise TopError(
                f"task {container_id!r} has no shim address in {bundle}: {error}"
            ) from None
    return str(address).removeprefix("unix://")


async def list_processes(socket: str, container_id: str) -> agent_pb2.ListProcessesResponse:
    from harpoon.ttrpc.client import Client

    try:
        client = await Client.connect_unix(socket)
    except OSError as error:
        raise TopError(f"cannot reach the shim of {container_id!r} at {socket}: {error}") from None
    try:
        request = guest_pb2.ListProcessesRequest(id=container_id)
        payload = await client.call(
            SERVICE, "ListProcesses", request.SerializeToString(), timeout=CALL_TIMEOUT_S
        )
    except TtrpcError as error:
        if error.code == Code.UNIMPLEMENTED:
            raise TopError(
                f"{container_id!r} does not run under harpoon (its shim has no {SERVICE})"
            ) from None
        raise TopError(f"listing the processes of {container_id!r}: {error}") from None
    finally:
        await client.close()
    response = agent_pb2.ListProcessesResponse()
    response.ParseFromString(payload)
    return response


def processes_of(
    state_dir: Path, namespace: str, container_id: str
) -> agent_pb2.ListProcessesResponse:
    """The processes of the task `container_id` (found by find_container)."""
    socket = shim_socket(state_dir, namespace, container_id)
    return asyncio.run(list_processes(socket, container_id))


def tty_name(tty_nr: int) -> str:
    """ps's TTY column for a /proc/PID/stat tty_nr."""
    if tty_nr == 0:
        return "?"
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if major in PTS_MAJORS:
        return f"pts/{(major - PTS_MAJORS.start) * 256 + minor}"
    if major == TTY_MAJOR and minor < 64:
        return f"tty{minor}"
    return "?"


def cpu_time(seconds: int) -> str:
    """ps's TIME: [DD-]HH:MM:SS."""
    days, rest = divmod(seconds, SECONDS_PER_DAY)
    text = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}-{text}" if days else text


def start_time(started: float, now: float) -> str:
    """ps's STIME: the hour and minute today, else the month and day."""
    here = time.localtime(started)
    if time.localtime(now)[:3] == here[:3]:
        return time.strftime("%H:%M", here)
    return time.strftime("%b%d", here)


def rows(response: agent_pb2.ListProcessesResponse, now: float) -> list[tuple[str, ...]]:
    """One row of ps -ef's columns per process; `now` is the host's time."""
    hz = response.ticks_per_second or 100
    found: list[tuple[str, ...]] = []
    for process in response.processes:
        elapsed_ticks = max(response.uptime_ticks - process.start_ticks, 1)
        usage = min(process.cpu_ticks * 100 // elapsed_ticks, 99)
        command = " ".join(process.args) if process.args else f"[{process.comm}]"
        found.append((
            process.user or str(process.uid), str(process.pid), str(process.ppid), str(usage),
            start_time(now - elapsed_ticks / hz, now), tty_name(process.tty_nr),
            cpu_time(process.cpu_ticks // hz), command,
        ))  # fmt: skip
    return found


def table(lines: Sequence[tuple[str, ...]]) -> str:
    """ps's layout: each column as wide as its widest cell, the last one as it is."""
    everything = [HEADER, *lines]
    widths = [max(len(line[i]) for line in everything) for i in range(len(HEADER) - 1)]
    out = []
    for line in everything:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out) + "\n"
