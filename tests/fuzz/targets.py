"""The fuzz targets: each takes one input (bytes) and raises only on a crash.

A crash is what the code under test does not promise: an exception of a type its
contract does not name, or a broken invariant (raised here as `Broken`). What each
target's code promises is in its docstring. The same functions run under atheris
(tests/fuzz/harness.py: coverage-guided, byte-level), in the short run of
`scripts/test` (tests/fuzz/test_fuzz_short.py) and as regression tests for the crashes
they found (tests/unit/test_fuzz_regressions.py).

Inputs are plain bytes; where a target needs more than one value (how to cut a stream
into the chunks a transport delivers, which side of a request to decode), it reads them
from the first bytes (`_split`), so libFuzzer's mutations steer them too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from harpoon.agent import processes
from harpoon.agent.container import Container, OciProcess
from harpoon.api.agent.v1 import agent_pb2
from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from harpoon.api.ttrpc import request_pb2
from harpoon.errdefs import InvalidArgument
from harpoon.shim import bootstrap, wire
from harpoon.ttrpc.codec import (
    HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    Flags,
    Frame,
    FrameDecoder,
    FramingError,
    OversizedFrame,
    encode_frame,
)
from harpoon.ttrpc.protocol import (
    ClientConnection,
    ConnectionBroken,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    StreamEnded,
    StreamRejected,
)
from harpoon.ttrpc.service import _parse as parse_payload
from harpoon.ttrpc.status import Code, TtrpcError
from tests.wire_oracle import params_read_by_protobuf

#: The task id `shim start` is run with in the start target (the seeds' instance_id).
TASK_ID = "fuzz-task"
# Decoder limits the codec target picks from: the real one, and small ones that make
# oversized frames (skipped, never buffered) reachable by short inputs.
_LIMITS = (MAX_MESSAGE_BYTES, 0, 16, 300)


class Broken(AssertionError):
    """An invariant the code under test promises does not hold."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise Broken(what)


def _split(data: bytes) -> tuple[int, list[int], bytes]:
    """(control byte, chunk sizes, stream): data[0]'s low 4 bits say how many of the next
    bytes are chunk sizes (each 1..256, used in turn); the rest is the stream."""
    if not data:
        return 0, [], b""
    control = data[0]
    count = control & 0x0F
    sizes = [size + 1 for size in data[1 : 1 + count]]
    return control, sizes, data[1 + count :]


def _chunks(stream: bytes, sizes: list[int]) -> Iterator[bytes]:
    """stream cut into pieces of the given sizes, in turn (whole if there are none)."""
    if not sizes:
        yield stream
        return
    pos, turn = 0, 0
    while pos < len(stream):
        size = sizes[turn % len(sizes)]
        yield stream[pos : pos + size]
        pos += size
        turn += 1


# -- ttrpc codec ------------------------------------------------------------------------


def codec(data: bytes) -> None:
    """FrameDecoder promises: any bytes, split anywhere, decode without an exception to
    the same events as the bytes fed at once; a FramingError is the last event; it
    buffers at most a header or one frame's payload (never an oversized one); and every
    Frame re-encodes (encode_frame) to the bytes it was decoded from."""
    control, sizes, stream = _split(data)
    limit = _LIMITS[control >> 6]
    whole = FrameDecoder(limit).feed(stream)
    decoder = FrameDecoder(limit)
    events: list[object] = []
    for chunk in _chunks(stream, sizes):
        events += decoder.feed(chunk)
        _check(
            decoder.buffered_bytes <= max(HEADER_BYTES, limit),
            f"buffered {decoder.buffered_bytes} bytes over the limit {limit}",
        )
    _check(events == whole, "the events depend on how the bytes were split")
    broken = [i for i, event in enumerate(events) if isinstance(event, FramingError)]
    _check(broken in ([], [len(events) - 1]), "a FramingError that is not the last event")
    if not any(isinstance(event, OversizedFrame | FramingError) for event in events):
        encoded = b"".join(encode_frame(event) for event in events if isinstance(event, Frame))
        _check(stream.startswith(encoded), "a frame does not re-encode to its bytes")
        _check(len(stream) - len(encoded) < HEADER_BYTES + limit + 1, "bytes left undecoded")


# -- ttrpc protocol ---------------------------------------------------------------------


def protocol_server(data: bytes) -> None:
    """ServerConnection promises: any bytes give events (a broken rule is a
    StreamRejected, undecodable bytes a final ConnectionBroken), never an exception; the
    events do not depend on how the bytes were split; requests are accepted on odd,
    increasing ids only; every send_* gives one well-formed frame (or None for a stream
    that is no longer owed one)."""
    _, sizes, stream = _split(data)
    whole = ServerConnection().receive_data(stream)
    server = ServerConnection()
    events: list[object] = []
    for chunk in _chunks(stream, sizes):
        events += server.receive_data(chunk)
    _check(events == whole, "the server's events depend on how the bytes were split")
    _check_server_events(events)
    _answer_as_a_server_would(stream, sizes)


def _check_server_events(events: list[object]) -> None:
    last_request = 0
    for index, event in enumerate(events):
        if isinstance(event, ConnectionBroken):
            _check(index == len(events) - 1, "events after ConnectionBroken")
        elif isinstance(event, RequestReceived):
            sid = event.stream_id
            _check(sid % 2 == 1 and sid > last_request, f"request accepted on stream {sid}")
            last_request = sid
        else:
            _check(
                isinstance(event, DataReceived | StreamEnded | StreamRejected),
                f"not a server event: {event!r}",
            )


def _answer_as_a_server_would(stream: bytes, sizes: list[int]) -> None:
    """Feeds the bytes again, answering each event as harpoon's server does (in one of
    its ways, chosen by the stream id), so that streams end while frames still arrive."""
    server = ServerConnection()
    for chunk in _chunks(stream, sizes):
        for event in server.receive_data(chunk):
            if isinstance(event, StreamRejected):
                _one_frame(server.send_rejection(event))
            elif isinstance(event, RequestReceived):
                sid = event.stream_id
                way = sid // 2 % 4
                if way == 0:
                    _one_frame(server.send_response(sid, event.request.payload))
                elif way == 1:
                    _one_frame(server.send_error(sid, Code.NOT_FOUND, "no such thing"))
                elif way == 2:
                    _one_frame(server.send_data(sid, b"out"))
                    _one_frame(server.send_end(sid))
                # way 3: the handler is still running when the next bytes arrive


def _one_frame(encoded: object) -> None:
    if encoded is None:
        return
    _check(isinstance(encoded, bytes), f"send_* gave {type(encoded).__name__}")
    assert isinstance(encoded, bytes)
    decoder = FrameDecoder()
    frames = decoder.feed(encoded)
    _check(
        len(frames) == 1 and isinstance(frames[0], Frame) and decoder.buffered_bytes == 0,
        f"send_* gave not exactly one frame: {frames!r}",
    )


def protocol_client(data: bytes) -> None:
    """ClientConnection promises: any bytes give events, never an exception; events
    only for streams it started and has not forgotten; after a stream's
    ResponseReceived or StreamEnded, nothing more for it; ConnectionBroken last."""
    control, sizes, stream = _split(data)
    client = ClientConnection()
    # 0..7 calls, the odd-numbered ones streaming, the last one given up on when the
    # control byte's bit 7 is set.
    started = [
        client.start_request(
            request_pb2.Request(service="svc", method="M", payload=b"p"),
            Flags.REMOTE_OPEN if n % 2 else Flags.NONE,
        )[0]
        for n in range(control >> 4 & 0x07)
    ]
    open_ = set(started)
    if started and control & 0x80:
        client.forget(started[-1])
        open_.discard(started[-1])
    events: list[object] = []
    for chunk in _chunks(stream, sizes):
        events += client.receive_data(chunk)
    for index, event in enumerate(events):
        if isinstance(event, ConnectionBroken):
            _check(index == len(events) - 1, "events after ConnectionBroken")
            continue
        _check(
            isinstance(event, ResponseReceived | DataReceived | StreamEnded),
            f"not a client event: {event!r}",
        )
        assert isinstance(event, ResponseReceived | DataReceived | StreamEnded)
        _check(event.stream_id in open_, f"an event for stream {event.stream_id}, not open")
        if isinstance(event, ResponseReceived):
            _check(isinstance(event.code, Code), f"a response code {event.code!r}")
        if not isinstance(event, DataReceived):
            open_.discard(event.stream_id)


# -- the agent's requests ---------------------------------------------------------------

# find_executable looks under a root; one that does not exist finds nothing, quickly.
_EMPTY_ROOT = "/nonexistent/harpoon-fuzz-root"


# The keys the agent reads, for documents built from bytes (_json_document).
_OCI_KEYS = ("root", "path", "process", "args", "env", "cwd", "hooks", "poststart", "x")
_MAX_BUILD_DEPTH = 32


def _json_document(data: bytes, depth: int = 0) -> tuple[str, bytes]:
    """JSON text built from data's first bytes, and the bytes left: how the agent target
    gets documents that are JSON of any shape, with the spec's keys, out of libFuzzer's
    byte mutations (which rarely keep JSON text JSON). Each value is one byte, its kind
    in the low 3 bits and a count above them; the text is made without recursing deeper
    than _MAX_BUILD_DEPTH (the nesting of kind 7 is the parser's to recurse into)."""
    if not data or depth > _MAX_BUILD_DEPTH:
        return "null", data[1:]
    kind, count, rest = data[0] & 0x07, data[0] >> 3, data[1:]
    if kind in (0, 1, 2):
        scalar: object = (None, bool(count & 1), count - 16)[kind]
        return json.dumps(scalar), rest
    if kind in (3, 6):
        text = rest[:count].decode("utf-8", "replace")
        return json.dumps("/" + text if kind == 6 else text), rest[count:]
    if kind in (4, 5):
        items: list[str] = []
        for n in range(count % 4):
            item, rest = _json_document(rest, depth + 1)
            key = json.dumps(_OCI_KEYS[(count + n) % len(_OCI_KEYS)])
            items.append(item if kind == 4 else f"{key}: {item}")
        opening, closing = "[]" if kind == 4 else "{}"
        return opening + ", ".join(items) + closing, rest
    inner, rest = _json_document(rest, depth + 1)
    return "[" * count * 64 + inner + "]" * count * 64, rest


def agent_request(data: bytes) -> None:
    """What the agent's CreateProcess decodes of a request, and the calls it makes with
    that before crun runs. data[0] chooses: 0-63, a container's init spec (the rest:
    oci_json for Container.parse); 64-127, the same, a document built by
    _json_document; 128-191, an exec's process (OciProcess.parse); 192-255, a whole
    CreateProcessRequest (the rest: its protobuf payload, parsed as the ttrpc service
    layer parses it). Promised: a TtrpcError of the INTERNAL class for a payload that
    is not protobuf, InvalidArgument for an OCI document that is not one, and otherwise
    a process whose args, env and cwd have their types, which find_executable can then
    look up (in an empty root here)."""
    if not data:
        return
    selector, rest = data[0], data[1:]
    if 64 <= selector < 128:
        rest = _json_document(rest)[0].encode()
    try:
        if selector < 128:
            process = Container.parse(rest).process
        elif selector < 192:
            process = OciProcess.parse(rest)
        else:
            request = parse_payload(agent_pb2.CreateProcessRequest, rest, "fuzz")
            if not request.oci_json:
                return
            parse = Container.parse if request.container_init else OciProcess.parse
            parsed = parse(request.oci_json)
            process = parsed.process if isinstance(parsed, Container) else parsed
    except InvalidArgument:
        return
    except TtrpcError as error:
        _check(
            selector >= 192 and error.code == Code.INTERNAL,
            f"{error.code!r}: {error.message}",
        )
        return
    _check(
        all(isinstance(a, str) for a in process.args)
        and all(isinstance(e, str) for e in process.env)
        and isinstance(process.cwd, str),
        f"a parsed process with untyped fields: {process!r}",
    )
    if process.args:
        processes.find_executable(process.args[0], process.env, process.cwd, _EMPTY_ROOT)


# -- the shim's start and delete --------------------------------------------------------


def shim_start(data: bytes) -> None:
    """What `shim start` reads on stdin. Promised: parse_start_stdin answers every input
    (nothing to go on is StartInput(None, None)); decode_params and wire.fields raise
    WireError only; and what both they and the generated classes accept, they read the
    same (tests/unit/test_shim_wire.py holds the hand-written code to the generated
    classes for valid messages; this extends it to any bytes both accept)."""
    parsed = bootstrap.parse_start_stdin(data, TASK_ID)
    _check(isinstance(parsed, bootstrap.StartInput), f"parse_start_stdin gave {parsed!r}")
    try:
        for number, wire_type, value in wire.fields(data):
            _check(number > 0 and wire_type in (0, 1, 2, 5), f"field {number}, type {wire_type}")
            _check(isinstance(value, bytes if wire_type == 2 else int), f"value {value!r}")
        params = bootstrap.decode_params(data)
        options = bootstrap._any(data)
    except wire.WireError:
        return
    _same_as_generated(data, params, options)


def _same_as_generated(
    data: bytes, params: bootstrap.BootstrapParams, options: bootstrap.AnyMessage
) -> None:
    try:
        message = bootstrap_pb2.BootstrapParams.FromString(data)
        generated_any = any_pb2.Any.FromString(data)
    except DecodeError:
        return  # protobuf is stricter (field numbers over 2^29, say): nothing to compare
    expected = params_read_by_protobuf(message)
    _check(params == expected, f"decode_params read {params!r}, protobuf {expected!r}")
    expected_any = bootstrap.AnyMessage(generated_any.type_url, generated_any.value)
    _check(options == expected_any, f"_any read {options!r}, protobuf {expected_any!r}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "codec": codec,
    "protocol_server": protocol_server,
    "protocol_client": protocol_client,
    "agent_request": agent_request,
    "shim_start": shim_start,
}
