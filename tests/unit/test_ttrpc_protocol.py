"""The ttrpc stream rules, checked on the sans-IO state machines without any socket."""

from __future__ import annotations

import struct

import pytest

from harpoon.api.google.rpc import status_pb2
from harpoon.api.ttrpc import request_pb2
from harpoon.ttrpc.codec import (
    MAX_MESSAGE_BYTES,
    Flags,
    Frame,
    FrameDecoder,
    MessageType,
    Parts,
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
from harpoon.ttrpc.status import Code, TtrpcError

pytestmark = pytest.mark.timeout(10)


def request_frame(stream_id: int, flags: Flags = Flags.NONE, method: str = "Echo") -> bytes:
    request = request_pb2.Request(service="svc", method=method, payload=b"p")
    return encode_frame(Frame(stream_id, MessageType.REQUEST, flags, request.SerializeToString()))


def data_frame(stream_id: int, payload: bytes, flags: Flags = Flags.NONE) -> bytes:
    return encode_frame(Frame(stream_id, MessageType.DATA, flags, payload))


def decode_one(data: bytes) -> Frame:
    [frame] = FrameDecoder().feed(data)
    assert isinstance(frame, Frame)
    return frame


def decode_response(data: bytes) -> request_pb2.Response:
    frame = decode_one(data)
    assert frame.type == MessageType.RESPONSE and frame.flags == Flags.NONE
    return request_pb2.Response.FromString(frame.payload)


# -- server side -----------------------------------------------------------------------


def test_server_accepts_odd_increasing_stream_ids() -> None:
    server = ServerConnection()
    events = server.receive_data(request_frame(1) + request_frame(3) + request_frame(11))
    assert [type(e) for e in events] == [RequestReceived] * 3
    assert [e.stream_id for e in events if isinstance(e, RequestReceived)] == [1, 3, 11]
    first = events[0]
    assert isinstance(first, RequestReceived)
    assert (first.request.service, first.request.method, first.request.payload) == (
        "svc",
        "Echo",
        b"p",
    )
    assert first.remote_open is False


def test_server_rejects_even_stream_id() -> None:
    [event] = ServerConnection().receive_data(request_frame(2))
    assert event == StreamRejected(
        2, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
    )


@pytest.mark.parametrize("second", [1, 3])
def test_server_rejects_reused_or_decreasing_stream_id(second: int) -> None:
    server = ServerConnection()
    server.receive_data(request_frame(3))
    [event] = server.receive_data(request_frame(second))
    assert event == StreamRejected(
        second, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
    )
    assert server.is_active(3)


def test_server_rejects_undecodable_request_and_keeps_going() -> None:
    server = ServerConnection()
    bad = encode_frame(Frame(1, MessageType.REQUEST, Flags.NONE, b"\xff\xff\xff"))
    events = server.receive_data(bad + request_frame(3))
    assert isinstance(events[0], StreamRejected)
    assert events[0].code == Code.INVALID_ARGUMENT and events[0].stream_id == 1
    assert isinstance(events[1], RequestReceived) and events[1].stream_id == 3


def test_server_rejects_oversized_request_on_its_id() -> None:
    header = struct.pack(">IIBB", MAX_MESSAGE_BYTES + 1, 5, MessageType.REQUEST, 0)
    [event] = ServerConnection().receive_data(header)
    assert isinstance(event, StreamRejected)
    assert (event.stream_id, event.code, event.ends_stream) == (5, Code.RESOURCE_EXHAUSTED, False)


def test_oversized_data_ends_the_stream_it_was_for() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1, Flags.REMOTE_OPEN))
    header = struct.pack(">IIBB", MAX_MESSAGE_BYTES + 1, 1, MessageType.DATA, 0)
    [event] = server.receive_data(header)
    assert isinstance(event, StreamRejected)
    assert (event.code, event.ends_stream) == (Code.RESOURCE_EXHAUSTED, True)
    assert not server.is_active(1)


def test_server_reports_broken_framing() -> None:
    [event] = ServerConnection().receive_data(b"\xde\xad\xbe\xef" * 8)
    assert isinstance(event, ConnectionBroken)


def test_server_ignores_responses_and_unknown_types() -> None:
    server = ServerConnection()
    response = encode_frame(Frame(1, MessageType.RESPONSE, Flags.NONE, b""))
    unknown = encode_frame(Frame(1, 0x42, Flags.NONE, b"future"))
    assert server.receive_data(response + unknown) == []


def test_client_stream_data_then_close() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1, Flags.REMOTE_OPEN))
    events = server.receive_data(
        data_frame(1, b"a")
        + data_frame(1, b"")
        + data_frame(1, b"", Flags.REMOTE_CLOSED | Flags.NO_DATA)
    )
    assert events == [DataReceived(1, b"a"), DataReceived(1, b""), StreamEnded(1)]
    # Still owed an answer after the client finished sending.
    assert server.is_active(1)


def test_empty_close_without_no_data_flag_is_a_last_empty_message() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1, Flags.REMOTE_OPEN))
    events = server.receive_data(data_frame(1, b"", Flags.REMOTE_CLOSED))
    assert events == [DataReceived(1, b""), StreamEnded(1)]


def test_close_carrying_data_is_rejected() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1, Flags.REMOTE_OPEN))
    [event] = server.receive_data(data_frame(1, b"x", Flags.REMOTE_CLOSED))
    assert event == StreamRejected(
        1, Code.INVALID_ARGUMENT, "data close message cannot include data", ends_stream=True
    )
    assert not server.is_active(1)


def test_data_for_a_stream_never_opened_is_rejected() -> None:
    [event] = ServerConnection().receive_data(data_frame(9, b"x"))
    assert event == StreamRejected(9, Code.INVALID_ARGUMENT, "StreamID is no longer active")


def test_data_after_the_stream_finished_is_dropped_quietly() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1, Flags.REMOTE_OPEN))
    assert server.send_response(1, b"done") is not None
    assert server.receive_data(data_frame(1, b"late")) == []


def test_data_to_a_unary_stream_is_ignored() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1))
    assert server.receive_data(data_frame(1, b"x")) == []


def test_success_response_has_no_status_and_closes_the_stream() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1))
    data = server.send_response(1, b"result")
    assert data is not None
    response = decode_response(data)
    assert not response.HasField("status") and response.payload == b"result"
    assert server.send_response(1, b"again") is None


def test_error_response_carries_status() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1))
    data = server.send_error(1, Code.NOT_FOUND, "no such task")
    assert data is not None
    response = decode_response(data)
    assert response.status == status_pb2.Status(code=5, message="no such task")
    assert not server.is_active(1)
    assert server.send_error(1, Code.INTERNAL, "twice") is None


def test_rejection_is_answered_on_the_offending_id() -> None:
    server = ServerConnection()
    [event] = server.receive_data(request_frame(4))
    assert isinstance(event, StreamRejected)
    response = decode_response(server.send_rejection(event))
    assert decode_one(server.send_rejection(event)).stream_id == 4
    assert response.status.code == Code.INVALID_ARGUMENT


def test_server_stream_data_and_end_frames() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1, Flags.REMOTE_CLOSED))
    data = server.send_data(1, b"chunk")
    end = server.send_end(1)
    assert data is not None and end is not None
    assert decode_one(data) == Frame(1, MessageType.DATA, Flags.NONE, b"chunk")
    assert decode_one(end) == Frame(1, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")
    assert server.send_data(1, b"after the end") is None


def test_a_message_in_pieces_makes_the_same_frame_unjoined() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1, Flags.REMOTE_CLOSED))
    big = bytes(range(256)) * 4096
    frame = server.send_data(1, Parts(b"\x0a", b"prefix-", big))
    assert isinstance(frame, Parts) and frame.pieces[-1] is big  # not copied
    assert frame.joined() == server.send_data(1, b"\x0aprefix-" + big)
    with pytest.raises(TtrpcError) as raised:
        server.send_data(1, Parts(b"x", bytes(MAX_MESSAGE_BYTES)))
    assert raised.value.code == Code.RESOURCE_EXHAUSTED


def test_oversized_response_payload_is_refused_before_closing_the_stream() -> None:
    server = ServerConnection()
    server.receive_data(request_frame(1))
    with pytest.raises(TtrpcError) as raised:
        server.send_response(1, bytes(MAX_MESSAGE_BYTES + 1))
    assert raised.value.code == Code.RESOURCE_EXHAUSTED
    assert server.is_active(1)


# -- client side -----------------------------------------------------------------------


def test_client_allocates_odd_increasing_ids() -> None:
    client = ClientConnection()
    ids = [client.start_request(request_pb2.Request(), Flags.NONE)[0] for _ in range(4)]
    assert ids == [1, 3, 5, 7]


def test_client_request_frame_carries_flags_and_request() -> None:
    request = request_pb2.Request(service="s", method="m", payload=b"x", timeout_nano=5)
    sid, data = ClientConnection().start_request(request, Flags.REMOTE_OPEN)
    frame = decode_one(data)
    assert (frame.stream_id, frame.type, frame.flags) == (sid, MessageType.REQUEST, 2)
    assert request_pb2.Request.FromString(frame.payload) == request


def test_client_refuses_oversized_request_without_using_an_id() -> None:
    client = ClientConnection()
    with pytest.raises(TtrpcError) as raised:
        client.start_request(request_pb2.Request(payload=bytes(MAX_MESSAGE_BYTES)), Flags.NONE)
    assert raised.value.code == Code.RESOURCE_EXHAUSTED
    assert client.start_request(request_pb2.Request(), Flags.NONE)[0] == 1


def response_frame(stream_id: int, response: request_pb2.Response) -> bytes:
    return encode_frame(
        Frame(stream_id, MessageType.RESPONSE, Flags.NONE, response.SerializeToString())
    )


def test_client_reads_success_and_error_responses() -> None:
    client = ClientConnection()
    a, _ = client.start_request(request_pb2.Request(), Flags.NONE)
    b, _ = client.start_request(request_pb2.Request(), Flags.NONE)
    error = request_pb2.Response(status=status_pb2.Status(code=6, message="exists"))
    # An explicit OK status is success too.
    ok = request_pb2.Response(status=status_pb2.Status(code=0), payload=b"r")
    events = client.receive_data(response_frame(b, error) + response_frame(a, ok))
    assert events == [
        ResponseReceived(b, Code.ALREADY_EXISTS, "exists", b""),
        ResponseReceived(a, Code.OK, "", b"r"),
    ]


def test_client_drops_frames_for_streams_it_does_not_wait_for() -> None:
    client = ClientConnection()
    sid, _ = client.start_request(request_pb2.Request(), Flags.NONE)
    client.forget(sid)
    assert client.receive_data(response_frame(sid, request_pb2.Response())) == []
    assert client.receive_data(response_frame(99, request_pb2.Response())) == []


def test_client_stream_data_and_end() -> None:
    client = ClientConnection()
    sid, _ = client.start_request(request_pb2.Request(), Flags.REMOTE_CLOSED)
    events = client.receive_data(
        data_frame(sid, b"1")
        + data_frame(sid, b"")
        + data_frame(sid, b"", Flags.REMOTE_CLOSED | Flags.NO_DATA)
        + data_frame(sid, b"after the end")
    )
    assert events == [DataReceived(sid, b"1"), DataReceived(sid, b""), StreamEnded(sid)]


def test_client_reports_oversized_and_undecodable_responses_on_their_stream() -> None:
    client = ClientConnection()
    a, _ = client.start_request(request_pb2.Request(), Flags.NONE)
    b, _ = client.start_request(request_pb2.Request(), Flags.NONE)
    oversized = struct.pack(">IIBB", MAX_MESSAGE_BYTES + 1, a, MessageType.RESPONSE, 0)
    oversized += bytes(MAX_MESSAGE_BYTES + 1)
    garbled = encode_frame(Frame(b, MessageType.RESPONSE, Flags.NONE, b"\xff\xff"))
    first, second = client.receive_data(oversized + garbled)
    assert isinstance(first, ResponseReceived) and first.code == Code.RESOURCE_EXHAUSTED
    assert isinstance(second, ResponseReceived) and second.code == Code.INTERNAL
