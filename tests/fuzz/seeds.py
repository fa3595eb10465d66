"""The fuzzers' seed corpus: valid inputs for each target, made by the real encoders
(harpoon's ttrpc connections, the generated protobuf classes, the agent's own OCI spec),
so a mutation starts from what a peer really sends. Generated on every run, never
stored: they follow the encoders as these change.

Each seed carries the target's control byte first (tests/fuzz/targets.py, `_split`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from google.protobuf import any_pb2

from harpoon.agent import warm_up
from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from harpoon.api.ttrpc import request_pb2
from harpoon.ttrpc.codec import Flags, Frame, MessageType, encode_frame
from harpoon.ttrpc.protocol import ClientConnection, ServerConnection
from harpoon.ttrpc.status import Code
from tests.fuzz.targets import TASK_ID

# Control bytes: no chunk sizes (whole), and three sizes 1, 7 and 64 (byte by byte
# first, then bigger pieces).
_WHOLE = bytes([0x00])
_CUT = bytes([0x03, 0, 6, 63])


def _client_bytes() -> list[bytes]:
    """What harpoon's client sends: a unary call, a client stream and its end."""
    client = ClientConnection()
    request = request_pb2.Request(
        service="harpoon.agent.v1.Agent",
        method="CreateProcess",
        payload=agent_pb2.CreateProcessRequest(id="init", oci_json=b"{}").SerializeToString(),
        timeout_nano=5_000_000_000,
        metadata=[request_pb2.KeyValue(key="k", value="v")],
    )
    unary = client.start_request(request, Flags.NONE)[1]
    sid, opening = client.start_request(request, Flags.REMOTE_OPEN)
    streaming = opening + client.send_data(sid, b"stdin") + client.send_end(sid)
    return [unary, streaming, unary + streaming]


def _server_bytes() -> list[bytes]:
    """What harpoon's server sends: a response, an error, stream data and its end."""
    server = ServerConnection()
    opened = b"".join(
        encode_frame(Frame(sid, MessageType.REQUEST, Flags.NONE, b"")) for sid in (1, 3, 5)
    )
    server.receive_data(opened)
    response = server.send_response(1, b"answer") or b""
    error = server.send_error(3, Code.NOT_FOUND, "process 'x' not found: not found") or b""
    data = server.send_data(5, b"output")
    end = server.send_end(5) or b""
    assert isinstance(data, bytes)
    return [response, error, data + end, response + error + data + end]


def codec() -> list[bytes]:
    streams = _client_bytes() + _server_bytes()
    return [control + stream for stream in streams for control in (_WHOLE, _CUT)]


def protocol_server() -> list[bytes]:
    return [control + stream for stream in _client_bytes() for control in (_WHOLE, _CUT)]


def protocol_client() -> list[bytes]:
    # Three calls started (bits 4-6), the data on stream 5.
    started = 0x30
    return [
        bytes([started | control[0]]) + control[1:] + stream
        for stream in _server_bytes()
        for control in (_WHOLE, _CUT)
    ]


def _oci_documents() -> tuple[bytes, bytes]:
    spec = warm_up.spec()
    spec["hooks"] = {"poststart": [{"path": "/bin/true"}]}
    return json.dumps(spec).encode(), json.dumps(spec["process"]).encode()


def agent_request() -> list[bytes]:
    init, exec_ = _oci_documents()
    requests = [
        agent_pb2.CreateProcessRequest(
            id="init", container_id="c", oci_json=init, container_init=True, stdout=True
        ),
        agent_pb2.CreateProcessRequest(
            id="exec", container_id="c", oci_json=exec_, terminal=True, stdin=True
        ),
    ]
    # Small documents too: a mutation of a short one is more often still JSON.
    small_init = b'{"root":{"path":"/r"},"process":{"args":["sh"],"env":["A=b"],"cwd":"/"}}'
    small_exec = b'{"args":["sh"],"env":["PATH=/bin"],"cwd":"/tmp"}'
    documents = [b"\x00" + init, b"\x00" + small_init, b"\x80" + exec_, b"\x80" + small_exec]
    # Documents that _json_document builds (objects with the spec's keys, nested).
    documents += [b"\x40" + bytes(range(start, 256, 7)) for start in (5, 13, 29)]
    return documents + [b"\xc0" + request.SerializeToString() for request in requests]


def shim_start() -> list[bytes]:
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\x0a\x0bconfig.toml")
    params = bootstrap_pb2.BootstrapParams(
        instance_id=TASK_ID,
        namespace="default",
        log_level=bootstrap_pb2.DEBUG,
        containerd_version="v2.3.7",
        containerd_ttrpc_address="/run/containerd/containerd.sock.ttrpc",
        containerd_grpc_address="/run/containerd/containerd.sock",
        containerd_binary="/usr/bin/containerd",
        extensions=[bootstrap_pb2.Extension(value=options)],
        socket_dir="/run/containerd/s",
    )
    minimal = bootstrap_pb2.BootstrapParams(instance_id=TASK_ID, namespace="default")
    return [
        b"",
        options.SerializeToString(),  # containerd 1.6 to 2.2: the runtime options alone
        params.SerializeToString(),
        minimal.SerializeToString(),
    ]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "codec": codec,
    "protocol_server": protocol_server,
    "protocol_client": protocol_client,
    "agent_request": agent_request,
    "shim_start": shim_start,
}

#: libFuzzer dictionaries: tokens a target's format is made of, which random mutations
#: would rarely spell out.
DICTIONARIES: dict[str, list[bytes]] = {
    "agent_request": [
        b'"root"',
        b'"path"',
        b'"process"',
        b'"args"',
        b'"env"',
        b'"cwd"',
        b'"hooks"',
        b'"poststart"',
        b"null",
        b"true",
        b"false",
        b"{}",
        b"[]",
        b'""',
        b"1e999",
        b'"\\ud800"',
        b'"\\u0000"',
    ],
}
