"""vfkit's REST API (vfkit 0.6, pkg/rest/rest.go and pkg/rest/vf/): the VM's state, and
changing it. harpoon runs it on a unix socket in the VM's state directory
(`--restful-uri unix://STATE/vfkit-rest.sock`).

    GET  /vm/state  -> 200 {"state": "VirtualMachineStateRunning", "canStart": false,
                            "canPause": true, "canResume": false, "canStop": true,
                            "canHardStop": true}
    POST /vm/state  {"state": "Pause"|"Resume"|"Stop"|"HardStop"}
                    -> 202 and no body; 400 {"error": ...} for a body it cannot read,
                       500 {"error": ...} when VZ refused (a Pause of a stopped VM)

"Stop" asks the guest to shut down (VZ's requestStop: harpoon's guest has no
power-button handler, so it is not used); "HardStop" stops the VM at once, and vfkit
exits once it has stopped. vfkit reports the VM's state only: the guest's readiness is
the agent's Hello.

Requests are built and answers read here without I/O (`state_request`,
`change_request`, `parse_response`, `parse_state`, `check_change`); `VfkitApi` sends
them over the socket with asyncio, one connection per request (`Connection: close`:
vfkit's Go server then closes once it has answered, so the answer is what comes before
EOF). The answer is parsed by the standard library's http.client from those bytes.
"""

from __future__ import annotations

import http.client
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harpoon.vmm.base import VMError

StateChange = Literal["Pause", "Resume", "Stop", "HardStop"]
STATE_CHANGES: tuple[StateChange, ...] = ("Pause", "Resume", "Stop", "HardStop")
STATE_PATH = "/vm/state"
#: The state names VZ's states have in vfkit's answers (Code-Hex/vz's String()).
STATE_PREFIX = "VirtualMachineState"
RUNNING = "Running"
PAUSED = "Paused"
STOPPED = "Stopped"
#: vfkit answers at once (a state change waits for VZ, which takes milliseconds).
API_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 1 << 20
READ_BYTES = 65536


class VfkitApiError(VMError):
    """vfkit's REST API did not answer, or refused a request; `status` is the HTTP
    status of a refusal (0 when there was no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class VmState:
    """GET /vm/state's answer. `state` without VZ's prefix: "Running", "Paused",
    "Stopped", "Error", "Starting", "Pausing", "Resuming", "Stopping"..."""

    state: str
    can_start: bool = False
    can_pause: bool = False
    can_resume: bool = False
    can_stop: bool = False
    can_hard_stop: bool = False


def _request(method: str, path: str, body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: vfkit", "Connection: close"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def state_request() -> bytes:
    return _request("GET", STATE_PATH)


def change_request(change: StateChange) -> bytes:
    if change not in STATE_CHANGES:
        raise ValueError(f"vfkit state change {change!r}: use one of {', '.join(STATE_CHANGES)}")
    return _request("POST", STATE_PATH, json.dumps({"state": change}).encode())


class _Answer:
    """What http.client.HTTPResponse reads an answer from: the bytes already received."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.1 answer (Content-Length or chunked);
    VfkitApiError if it is not one."""
    response = http.client.HTTPResponse(_Answer(data))  # type: ignore[arg-type]
    try:
        response.begin()
        return response.status, response.read()
    except (http.client.HTTPException, ValueError) as error:
        raise VfkitApiError(f"vfkit's answer {data[:200]!r} is not HTTP: {error!r}") from None


def parse_state(status: int, body: bytes) -> VmState:
    if status != http.client.OK:
        raise VfkitApiError(f"vfkit's VM state: it answered {status}: {_said(body)}", status)
    try:
        document = json.loads(body)
        state = str(document["state"])
        return VmState(
            state=state.removeprefix(STATE_PREFIX),
            can_start=bool(document.get("canStart", False)),
            can_pause=bool(document.get("canPause", False)),
            can_resume=bool(document.get("canResume", False)),
            can_stop=bool(document.get("canStop", False)),
            can_hard_stop=bool(document.get("canHardStop", False)),
        )
    except (ValueError, TypeError, KeyError) as error:
        raise VfkitApiError(f"vfkit's VM state {body[:200]!r}: {error!r}", status) from None


def check_change(change: StateChange, status: int, body: bytes) -> None:
    """Raises VfkitApiError, with vfkit's own words, unless vfkit took the change."""
    if status in (http.client.ACCEPTED, http.client.OK, http.client.NO_CONTENT):
        return
    raise VfkitApiError(f"vfkit refused {change}: it answered {status}: {_said(body)}", status)


def _said(body: bytes) -> str:
    """vfkit's error (gin's {"error": "..."}), or the body as it came."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, TypeError, KeyError):
        return body.decode(errors="replace").strip() or "(no message)"


class VfkitApi:
    """vfkit's REST API on its unix socket, one request per connection."""

    def __init__(self, socket_path: Path, timeout_s: float = API_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    async def state(self) -> VmState:
        return parse_state(*await self.send(state_request()))

    async def change(self, change: StateChange) -> None:
        check_change(change, *await self.send(change_request(change)))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of vfkit's answer; VfkitApiError if there is none."""
        import asyncio  # loaded by the time a VM is driven; not when it is launched

        answer = b""
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
                try:
                    writer.write(request)
                    await writer.drain()
                    while (chunk := await reader.read(READ_BYTES)) and len(
                        answer
                    ) <= MAX_ANSWER_BYTES:
                        answer += chunk
                finally:
                    writer.close()
        except (OSError, TimeoutError) as error:
            raise VfkitApiError(f"vfkit's API at {self.socket_path}: {error!r}") from None
        if len(answer) > MAX_ANSWER_BYTES:
            raise VfkitApiError(f"vfkit's API at {self.socket_path}: an answer over 1 MiB")
        return parse_response(answer)
