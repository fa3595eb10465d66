"""gvproxy's HTTP API (v0.8.9, pkg/services/forwarder): the ports it publishes.

Requests are built and answers read here without I/O (`expose_request`,
`check_expose`, `parse_exposed`, ...); `GvproxyApi` sends them over gvproxy's unix
socket with the standard library's http.client, one connection per request.

What gvproxy takes and answers (pkg/services/forwarder/ports.go):
`POST /services/forwarder/expose {"local": "127.0.0.1:8080", "remote":
"192.168.127.2:80", "protocol": "tcp"}` makes it listen at `local` on the host and
forward each connection (or datagram, "udp") to `remote` in the VM; `POST
/services/forwarder/unexpose {"local", "protocol"}` closes that listener before it
answers; `GET /services/forwarder/all` lists them. Success is 200 with no body; a
refusal is Go's http.Error, its text and a newline: 400 for a malformed request, 500
for what it could not do ("listen tcp 127.0.0.1:8080: bind: address already in use",
"proxy already running", "proxy not found", "unknown protocol sctp").
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal

#: One request: gvproxy answers locally, at once.
API_TIMEOUT_S = 5.0

Protocol = Literal["tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")


class GvproxyError(Exception):
    """gvproxy could not be found, started or stopped, or did not answer."""


class ApiError(GvproxyError):
    """gvproxy's API refused a request; `status` is its HTTP status, the message says
    what was asked and gvproxy's own words."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class PortInUse(ApiError):
    """The host address and port to publish are taken by another socket on the host."""


class AlreadyExposed(ApiError):
    """This gvproxy already publishes that protocol, host address and port."""


class NotExposed(ApiError):
    """This gvproxy publishes nothing at that protocol, host address and port."""


@dataclass(frozen=True)
class ApiRequest:
    method: Literal["GET", "POST"]
    path: str
    body: bytes | None = None


@dataclass(frozen=True)
class Forward:
    """A port gvproxy publishes: `host_address:host_port` on the host, forwarded to
    `guest_address:guest_port` in the VM. host_address "" is every host address."""

    protocol: str
    host_address: str
    host_port: int
    guest_address: IPv4Address
    guest_port: int

    @property
    def local(self) -> str:
        """The host end as gvproxy names it (its key for unexpose)."""
        return host_endpoint(self.host_address, self.host_port)

    def describe(self) -> str:
        return f"{self.protocol} {self.local} -> {self.guest_address}:{self.guest_port}"


def host_endpoint(host_address: str, host_port: int) -> str:
    """ "127.0.0.1:8080", "[::1]:8080" or ":8080" (every address), as gvproxy listens."""
    if not 1 <= host_port <= 65535:
        raise ValueError(f"host port {host_port} is outside 1..65535")
    if not host_address:
        return f":{host_port}"
    address = ipaddress.ip_address(host_address)  # a ValueError names what is wrong
    return f"[{address}]:{host_port}" if address.version == 6 else f"{address}:{host_port}"


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: gvproxy publishes one of {PROTOCOLS}")


def expose_request(forward: Forward) -> ApiRequest:
    _check_protocol(forward.protocol)
    if not 1 <= forward.guest_port <= 65535:
        raise ValueError(f"guest port {forward.guest_port} is outside 1..65535")
    body = {
        "local": forward.local,
        "remote": f"{forward.guest_address}:{forward.guest_port}",
        "protocol": forward.protocol,
    }
    return ApiRequest("POST", "/services/forwarder/expose", json.dumps(body).encode())


def unexpose_request(protocol: str, host_address: str, host_port: int) -> ApiRequest:
    _check_protocol(protocol)
    body = {"local": host_endpoint(host_address, host_port), "protocol": protocol}
    return ApiRequest("POST", "/services/forwarder/unexpose", json.dumps(body).encode())


def exposed_request() -> ApiRequest:
    return ApiRequest("GET", "/services/forwarder/all")


def check_expose(forward: Forward, status: int, body: bytes) -> None:
    """Raises what gvproxy's answer to expose_request(forward) means, if not success."""
    if status == http.client.OK:
        return
    said = _said(body)
    asked = f"publishing {forward.describe()}"
    if "address already in use" in said:
        raise PortInUse(
            f"{asked}: host port {forward.host_port} is in use on the host "
            f"(gvproxy: {said}); free it or publish another port",
            status,
        )
    if "proxy already running" in said:
        raise AlreadyExposed(f"{asked}: this VM publishes {forward.local} already", status)
    raise ApiError(f"{asked}: gvproxy answered {status}: {said}", status)


def check_unexpose(
    protocol: str, host_address: str, host_port: int, status: int, body: bytes
) -> None:
    """Raises what gvproxy's answer to unexpose_request(...) means, if not success."""
    if status == http.client.OK:
        return
    said = _said(body)
    local = host_endpoint(host_address, host_port)
    if "proxy not found" in said:
        raise NotExposed(f"unpublishing {protocol} {local}: this VM does not publish it", status)
    raise ApiError(f"unpublishing {protocol} {local}: gvproxy answered {status}: {said}", status)


def parse_exposed(status: int, body: bytes) -> list[Forward]:
    """The ports gvproxy's answer to exposed_request() lists (tcp and udp only: a
    "unix" or "npipe" forward has no host port)."""
    if status != http.client.OK:
        raise ApiError(f"listing published ports: gvproxy answered {status}: {_said(body)}", status)
    try:
        entries = json.loads(body)
        return [_forward(entry) for entry in entries if entry.get("protocol") in PROTOCOLS]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ApiError(
            f"listing published ports: gvproxy's answer {body[:200]!r}: {error}", status
        ) from error


def _forward(entry: dict[str, str]) -> Forward:
    host, _, host_port = entry["local"].rpartition(":")
    guest, _, guest_port = entry["remote"].rpartition(":")
    return Forward(
        protocol=entry["protocol"],
        host_address=host.strip("[]"),
        host_port=int(host_port),
        guest_address=IPv4Address(guest),
        guest_port=int(guest_port),
    )


def _said(body: bytes) -> str:
    # gvproxy's errors are Go's http.Error: the error's text and a newline.
    return body.decode(errors="replace").strip() or "(no message)"


class GvproxyApi:
    """gvproxy's HTTP API on its unix socket, one request per connection (stdlib
    http.client); `guest` is the address published ports forward to."""

    def __init__(self, socket_path: Path, guest: IPv4Address, timeout_s: float = API_TIMEOUT_S):
        self.socket_path = socket_path
        self.guest = guest
        self.timeout_s = timeout_s

    def expose(self, protocol: str, host_address: str, host_port: int, guest_port: int) -> Forward:
        """Publishes guest_port of the VM at host_address:host_port on the host; raises
        PortInUse, AlreadyExposed or ApiError."""
        forward = Forward(protocol, host_address, host_port, self.guest, guest_port)
        status, body = self.send(expose_request(forward))
        check_expose(forward, status, body)
        return forward

    def unexpose(self, protocol: str, host_address: str, host_port: int) -> None:
        """Stops publishing host_address:host_port (the host port is free once this
        returns); raises NotExposed or ApiError."""
        status, body = self.send(unexpose_request(protocol, host_address, host_port))
        check_unexpose(protocol, host_address, host_port, status, body)

    def exposed(self) -> list[Forward]:
        return parse_exposed(*self.send(exposed_request()))

    def send(self, request: ApiRequest) -> tuple[int, bytes]:
        """(status, body) of gvproxy's answer; GvproxyError if there is none."""
        connection = _UnixHTTPConnection(self.socket_path, self.timeout_s)
        try:
            headers = {"Content-Type": "application/json"} if request.body is not None else {}
            connection.request(request.method, request.path, request.body, headers)
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            raise GvproxyError(f"gvproxy's API at {self.socket_path}: {error!r}") from error
        finally:
            connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("gvproxy", timeout=timeout_s)  # the Host header; never resolved
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(os.fspath(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
