"""vfkit's REST API client (harpoon.vmm.vfkit_api): the requests as bytes, vfkit's
answers as its Go server writes them (gin's JSON, Content-Length or chunked), and the
client over a real unix socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from harpoon.vmm.vfkit_api import (
    VfkitApi,
    VfkitApiError,
    VmState,
    change_request,
    check_change,
    parse_response,
    parse_state,
    state_request,
)

pytestmark = pytest.mark.timeout(30)

RUNNING = (
    b'{"canHardStop":true,"canPause":true,"canResume":false,"canStart":false,'
    b'"canStop":true,"state":"VirtualMachineStateRunning"}'
)


def answer(status: str, body: bytes = b"", chunked: bool = False) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\n"
    if chunked:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_the_state_request_is_a_get_that_closes_the_connection() -> None:
    assert state_request() == b"GET /vm/state HTTP/1.1\r\nHost: vfkit\r\nConnection: close\r\n\r\n"


def test_a_change_is_posted_as_vfkits_json() -> None:
    request = change_request("HardStop")
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /vm/state HTTP/1.1"
    assert b"Content-Type: application/json" in head
    assert b"Content-Length: %d" % len(body) in head
    assert json.loads(body) == {"state": "HardStop"}
    with pytest.raises(ValueError, match="vfkit state change 'Reboot'"):
        change_request("Reboot")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunked", [False, True])
def test_the_state_is_read_without_vzs_prefix(chunked: bool) -> None:
    status, body = parse_response(answer("200 OK", RUNNING, chunked))
    assert parse_state(status, body) == VmState(
        "Running", can_pause=True, can_stop=True, can_hard_stop=True
    )


def test_a_change_vfkit_took_is_202_and_one_it_refused_carries_its_words() -> None:
    check_change("Pause", *parse_response(answer("202 Accepted")))
    refused = answer("500 Internal Server Error", b'{"error":"Invalid virtual machine state"}')
    with pytest.raises(
        VfkitApiError, match="vfkit refused Resume: it answered 500: Invalid virtual"
    ) as e:
        check_change("Resume", *parse_response(refused))
    assert e.value.status == 500


def test_what_is_not_an_answer_is_an_error_naming_it() -> None:
    with pytest.raises(VfkitApiError, match="is not HTTP"):
        parse_response(b"")
    with pytest.raises(VfkitApiError, match=r"vfkit's VM state b'\{\}'"):
        parse_state(200, b"{}")
    with pytest.raises(VfkitApiError, match="it answered 404: 404 page not found"):
        parse_state(404, b"404 page not found")


def test_the_client_talks_to_a_unix_socket_one_connection_per_request(tmp_path: Path) -> None:
    socket_path = tmp_path / "rest.sock"
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.startswith(b"Content-Length")
            ),
            0,
        )
        body = await reader.readexactly(length)
        seen.append(head.split(b"\r\n")[0] + b" " + body)
        if head.startswith(b"GET"):
            writer.write(answer("200 OK", RUNNING, chunked=True))
        else:
            writer.write(answer("202 Accepted"))
        await writer.drain()
        writer.close()  # as Go's server does after `Connection: close`

    async def scenario() -> None:
        server = await asyncio.start_unix_server(serve, str(socket_path))
        async with server:
            api = VfkitApi(socket_path)
            assert (await api.state()).state == "Running"
            await api.change("Pause")
        with pytest.raises(VfkitApiError, match=r"vfkit.s API at .*gone.sock: FileNotFoundError"):
            await VfkitApi(tmp_path / "gone.sock").state()

    asyncio.run(scenario())
    assert seen == [b"GET /vm/state HTTP/1.1 ", b'POST /vm/state HTTP/1.1 {"state": "Pause"}']
