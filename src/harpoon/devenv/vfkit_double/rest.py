"""vfkit's REST API (pkg/rest/rest.go) over a unix socket or loopback TCP.

Routes, as gin serves them for vfkit:
- `GET /vm/state`: 200 and the state with its flags (harpoon.devenv.vfkit_double.states);
- `POST /vm/state {"state": "Pause"|"Resume"|"Stop"|"HardStop"}`: 202 and no body once
  the change is made (Stop only asks the guest); 400 {"error"} for a body gin cannot
  bind, 500 {"error"} for a change vfkit or VZ refuses (pkg/rest/vf/vm_config.go);
- `GET /vm/inspect`: 200 and the VM's configuration as vfkit's JSON (pkg/config/json.go);
- anything else: gin's 404 "404 page not found".

`route` decides the answer (the VM does the work); `serve` speaks HTTP on a listener the
caller bound, so that a socket that cannot be bound stops vfkit before its VM starts.
`call` is a one-request client over the unix socket, for tests and for poking at a VM.

Difference from vfkit: `--restful-uri tcp://HOST:PORT` must name a loopback address
(vfkit binds any); a test double has no business on a network.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from harpoon.devenv.vfkit_double import http_wire, states
from harpoon.devenv.vfkit_double.cmdline import RestfulURI
from harpoon.devenv.vfkit_double.serving import accept_forever
from harpoon.devenv.vfkit_double.vsock import listen_unix

JSON = "application/json; charset=utf-8"
TEXT = "text/plain"


class VirtualMachine(Protocol):
    """What the API needs of the VM."""

    @property
    def state(self) -> states.VMState: ...

    def inspect(self) -> dict[str, Any]: ...

    async def change(self, requested: states.Requested) -> None:
        """Makes the change, or raises states.ChangeRefused."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = ""


def json_answer(status: int, document: dict[str, Any]) -> Answer:
    return Answer(status, json.dumps(document).encode(), JSON)


async def route(request: http_wire.Request, vm: VirtualMachine) -> Answer:
    if request.path == "/vm/state" and request.method == "GET":
        return json_answer(200, states.state_json(vm.state))
    if request.path == "/vm/state" and request.method == "POST":
        try:
            requested = states.parse_change_body(request.body)
        except states.BadRequest as error:
            return json_answer(400, {"error": str(error)})
        try:
            await vm.change(requested)
        except states.ChangeRefused as error:
            return json_answer(500, {"error": str(error)})
        return Answer(202)
    if request.path == "/vm/inspect" and request.method == "GET":
        return json_answer(200, vm.inspect())
    return Answer(404, b"404 page not found", TEXT)


def bind(uri: RestfulURI) -> socket.socket:
    """The listening socket for uri (not `none`), or OSError as Go's net.Listen fails."""
    if uri.scheme == "unix":
        return listen_unix(uri.path)
    try:
        infos = socket.getaddrinfo(uri.hostname, uri.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise OSError(f"listen tcp {uri.host}: {error}") from None
    family, kind, proto, _, address = infos[0]
    if not _is_loopback(str(address[0])):
        raise OSError(
            f"listen tcp {uri.host}: the vfkit test double serves its REST API on loopback only"
        )
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(16)
    except OSError as error:
        listener.close()
        raise OSError(f"listen tcp {uri.host}: bind: {error.strerror or error}") from None
    return listener


def _is_loopback(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address).is_loopback


async def serve(listener: socket.socket, vm: VirtualMachine) -> None:
    """Answers requests on listener until cancelled."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = http_wire.RequestParser()
        while data := await reader.read(65536):
            try:
                requests = parser.feed(data)
            except http_wire.HttpError as error:
                writer.write(http_wire.response(error.status, str(error).encode(), TEXT, False))
                await writer.drain()
                return
            for request in requests:
                answer = await route(request, vm)
                writer.write(
                    http_wire.response(
                        answer.status, answer.body, answer.content_type, request.keep_alive
                    )
                )
                await writer.drain()
                if not request.keep_alive:
                    return

    await accept_forever(listener, connection)


#: A client's wait for one answer: the double answers at once, a pause takes a moment.
CALL_TIMEOUT_S = 30.0


class UnixConnection(http.client.HTTPConnection):
    """http.client over a unix socket (persistent, as http.client's connections are)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=CALL_TIMEOUT_S)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CALL_TIMEOUT_S)
        self.sock.connect(self._path)


def call(
    socket_path: str, method: str, target: str, document: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """One request to a REST socket: the status and the JSON answer (None if empty)."""
    connection = UnixConnection(socket_path)
    try:
        body = None if document is None else json.dumps(document).encode()
        connection.request(method, target, body=body)
        answer = connection.getresponse()
        data = answer.read()
    finally:
        connection.close()
    if answer.getheader("Content-Type", "").startswith("application/json"):
        return answer.status, json.loads(data)
    return answer.status, data.decode() or None
