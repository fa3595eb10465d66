"""The vfkit double's REST API: VZ's states and flags, the state changes vfkit takes and
refuses, HTTP on the wire (sans-IO), and the server over a real unix socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from harpoon.devenv.vfkit_double import http_wire, rest, states
from harpoon.devenv.vfkit_double.cmdline import RestfulURI
from harpoon.devenv.vfkit_double.states import (
    BadRequest,
    ChangeRefused,
    Requested,
    StateChange,
    VMState,
)


def test_the_state_answer_carries_vzs_flags() -> None:
    assert states.state_json(VMState.RUNNING) == {
        "state": "VirtualMachineStateRunning",
        "canStart": False,
        "canPause": True,
        "canResume": False,
        "canStop": True,
        "canHardStop": True,
    }
    paused = states.state_json(VMState.PAUSED)
    assert (paused["canPause"], paused["canResume"], paused["canStop"], paused["canHardStop"]) == (
        False, True, False, True,
    )  # fmt: skip
    stopped = states.state_json(VMState.STOPPED)
    assert stopped["canStart"] and not any(
        stopped[flag] for flag in ("canPause", "canResume", "canStop", "canHardStop")
    )
    assert states.state_json(VMState.STARTING)["state"] == "VirtualMachineStateStarting"


@pytest.mark.parametrize(
    ("name", "state", "change"),
    [
        ("Pause", VMState.RUNNING, StateChange.PAUSE),
        ("Resume", VMState.PAUSED, StateChange.RESUME),
        ("Stop", VMState.RUNNING, StateChange.STOP),
        ("HardStop", VMState.RUNNING, StateChange.HARD_STOP),
        ("HardStop", VMState.PAUSED, StateChange.HARD_STOP),
    ],
)
def test_a_change_the_state_allows_is_made(name: str, state: VMState, change: StateChange) -> None:
    assert states.check_change(Requested(name), state) is change


@pytest.mark.parametrize(
    ("name", "state", "message"),
    [
        ("Pause", VMState.PAUSED, "Pause in VirtualMachineStatePaused"),
        ("Resume", VMState.RUNNING, "Resume in VirtualMachineStateRunning"),
        ("Stop", VMState.PAUSED, "Stop in VirtualMachineStatePaused"),
        ("HardStop", VMState.STARTING, "HardStop in VirtualMachineStateStarting"),
        ("Restart", VMState.RUNNING, "invalid new VMState: Restart"),
        ("", VMState.RUNNING, "invalid new VMState: "),
    ],
)
def test_a_change_vz_or_vfkit_refuses_is_refused(name: str, state: VMState, message: str) -> None:
    with pytest.raises(ChangeRefused, match=message):
        states.check_change(Requested(name), state)


def test_a_change_body_is_bound_as_gin_binds_it() -> None:
    assert states.parse_change_body(b'{"state": "Pause", "extra": 1}') == Requested("Pause")
    assert states.parse_change_body(b"{}") == Requested("")  # then "invalid new VMState: "
    for body, message in (
        (b"", "EOF"),
        (b"{", "invalid JSON"),
        (b"[]", "cannot unmarshal list"),
        (b'{"state": 3}', "cannot unmarshal int into Go struct field VMState.state"),
    ):
        with pytest.raises(BadRequest, match=message):
            states.parse_change_body(body)


def test_requests_are_parsed_from_bytes_however_they_arrive() -> None:
    wire = (
        b"GET /vm/state HTTP/1.1\r\nHost: x\r\n\r\n"
        b'POST /vm/state?x=1 HTTP/1.1\r\nContent-Length: 18\r\n\r\n{"state": "Pause"}'
        b"GET /vm/inspect HTTP/1.0\r\n\r\n"
    )
    parser = http_wire.RequestParser()
    requests = [request for byte in wire for request in parser.feed(bytes([byte]))]
    assert [(r.method, r.path, r.body, r.keep_alive) for r in requests] == [
        ("GET", "/vm/state", b"", True),
        ("POST", "/vm/state", b'{"state": "Pause"}', True),
        ("GET", "/vm/inspect", b"", False),
    ]
    assert requests[0].headers == {"host": "x"}


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /vm/state HTTP/2\r\n\r\n", 400),
        (b"POST /vm/state HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"POST /vm/state HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"POST /vm/state HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * http_wire.MAX_HEAD_BYTES, 431),
    ],
)
def test_a_malformed_request_is_an_http_error(wire: bytes, status: int) -> None:
    with pytest.raises(http_wire.HttpError) as caught:
        http_wire.RequestParser().feed(wire)
    assert caught.value.status == status


def test_a_response_is_complete() -> None:
    assert http_wire.response(202) == b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    assert http_wire.response(404, b"no", "text/plain", keep_alive=False) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\nno"
    )


class StandInVM:
    """The REST layer's view of a VM, its changes made in memory (QEMU is the VM tests')."""

    def __init__(self) -> None:
        self.state = VMState.RUNNING
        self.made: list[StateChange] = []

    def inspect(self) -> dict[str, Any]:
        return {"vcpus": 1, "memoryBytes": 512 << 20, "devices": []}

    async def change(self, requested: Requested) -> None:
        change = states.check_change(requested, self.state)
        self.made.append(change)
        self.state = {StateChange.PAUSE: VMState.PAUSED}.get(change, VMState.RUNNING)


def test_the_api_answers_over_a_unix_socket_on_one_connection(tmp_path: Path) -> None:
    path = tmp_path / "rest.sock"
    vm = StandInVM()

    def client() -> list[tuple[int, str, bytes]]:
        connection = rest.UnixConnection(str(path))
        answers = []
        for method, target, body in (
            ("GET", "/vm/state", None),
            ("POST", "/vm/state", b'{"state": "Pause"}'),
            ("GET", "/vm/state", None),
            ("POST", "/vm/state", b'{"state": "Pause"}'),
            ("POST", "/vm/state", b"not json"),
            ("GET", "/vm/inspect", None),
            ("DELETE", "/vm/state", None),
        ):
            connection.request(method, target, body=body)
            answer = connection.getresponse()
            answers.append((answer.status, answer.getheader("Content-Type") or "", answer.read()))
        connection.close()
        return answers

    async def scenario() -> list[tuple[int, str, bytes]]:
        listener = rest.bind(RestfulURI("unix", path=str(path)))
        server = asyncio.ensure_future(rest.serve(listener, vm))
        try:
            return await asyncio.to_thread(client)
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
            listener.close()

    answers = asyncio.run(scenario())

    assert [status for status, _, _ in answers] == [200, 202, 200, 500, 400, 200, 404]
    assert json.loads(answers[0][2])["state"] == "VirtualMachineStateRunning"
    assert answers[0][1] == rest.JSON
    assert answers[1][2] == b""  # gin's c.Status(202): no body
    assert json.loads(answers[2][2])["state"] == "VirtualMachineStatePaused"
    assert "invalid virtual machine state transition" in json.loads(answers[3][2])["error"]
    assert "error" in json.loads(answers[4][2])
    assert json.loads(answers[5][2])["vcpus"] == 1
    assert answers[6][2] == b"404 page not found"
    assert vm.made == [StateChange.PAUSE]


def test_a_rest_socket_that_exists_is_not_replaced(tmp_path: Path) -> None:
    """Go's net.Listen fails on an existing path; vfkit then exits 1."""
    path = tmp_path / "rest.sock"
    path.write_text("somebody's")
    with pytest.raises(OSError, match="bind: Address already in use"):
        rest.bind(RestfulURI("unix", path=str(path)))
    assert path.read_text() == "somebody's"


def test_tcp_is_served_on_loopback_only() -> None:
    with pytest.raises(OSError, match="loopback only"):
        rest.bind(RestfulURI("tcp", host="8.8.8.8:8081"))
    listener = rest.bind(RestfulURI("tcp", host="127.0.0.1:0"))
    with listener:
        assert listener.getsockname()[0] == "127.0.0.1"
