"""The ttrpc connection rules, as two sans-IO state machines: one per side.

``ServerConnection`` and ``ClientConnection`` consume the bytes a peer sent and return
events (a request arrived, stream data arrived, a stream must be rejected, ...); they
encode what their side sends. They enforce the stream rules (odd, increasing ids; which
streams may carry data; what a close may carry) so the asyncio glue in ``server`` and
``client`` only moves bytes and runs handlers. They must never do I/O, await, or run
user code.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from harpoon.api.google.rpc import status_pb2
from harpoon.api.ttrpc import request_pb2
from harpoon.ttrpc.codec import (
    MAX_MESSAGE_BYTES,
    Flags,
    Frame,
    FrameDecoder,
    FramingError,
    MessageType,
    OversizedFrame,
    Parts,
    Payload,
    Record,
    encode_frame,
    encode_frame_parts,
)
from harpoon.ttrpc.status import Code, TtrpcError

MAX_STREAM_ID = (1 << 32) - 1
_END_OF_STREAM = Flags.REMOTE_CLOSED | Flags.NO_DATA


_set = object.__setattr__


class RequestReceived(Record):
    """A client opened a stream. ``remote_open``: it will send Data frames on it."""

    __slots__ = ("stream_id", "request", "remote_open")  # noqa: RUF023 (field order)
    stream_id: int
    request: request_pb2.Request
    remote_open: bool

    def __init__(self, stream_id: int, request: request_pb2.Request, remote_open: bool) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "request", request)
        _set(self, "remote_open", remote_open)


class DataReceived(Record):
    """One stream message (possibly empty) from the peer."""

    __slots__ = ("stream_id", "payload")  # noqa: RUF023 (field order)
    stream_id: int
    payload: bytes

    def __init__(self, stream_id: int, payload: bytes) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "payload", payload)


class StreamEnded(Record):
    """The peer will send nothing more on this stream (server side: its requests are
    complete; client side: a server stream finished successfully)."""

    __slots__ = ("stream_id",)
    stream_id: int

    def __init__(self, stream_id: int) -> None:
        _set(self, "stream_id", stream_id)


class StreamRejected(Record):
    """Server side: a frame broke a rule. Send ``ServerConnection.send_rejection(event)``;
    if ``ends_stream``, a live stream was broken by it: abandon its handler too."""

    __slots__ = ("stream_id", "code", "message", "ends_stream")  # noqa: RUF023 (field order)
    stream_id: int
    code: Code
    message: str
    ends_stream: bool

    def __init__(self, stream_id: int, code: Code, message: str, ends_stream: bool = False) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "code", code)
        _set(self, "message", message)
        _set(self, "ends_stream", ends_stream)


class ResponseReceived(Record):
    """Client side: the final answer on a stream."""

    __slots__ = ("stream_id", "code", "message", "payload")  # noqa: RUF023 (field order)
    stream_id: int
    code: Code
    message: str
    payload: bytes

    def __init__(self, stream_id: int, code: Code, message: str, payload: bytes) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "code", code)
        _set(self, "message", message)
        _set(self, "payload", payload)


class ConnectionBroken(Record):
    """The byte stream cannot be decoded any more; close the connection."""

    __slots__ = ("reason",)
    reason: str

    def __init__(self, reason: str) -> None:
        _set(self, "reason", reason)


ServerEvent = RequestReceived | DataReceived | StreamEnded | StreamRejected | ConnectionBroken
ClientEvent = ResponseReceived | DataReceived | StreamEnded | ConnectionBroken


def _oversized_message(event: OversizedFrame) -> str:
    return f"message length {event.length} exceed maximum message size of {MAX_MESSAGE_BYTES}"


def _check_size(payload: Payload, what: str) -> None:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise TtrpcError(
            Code.RESOURCE_EXHAUSTED,
            f"{what} of {len(payload)} bytes exceeds the ttrpc maximum of "
            f"{MAX_MESSAGE_BYTES} bytes; split it into smaller messages",
        )


def _data_frame(stream_id: int, payload: bytes) -> bytes:
    _check_size(payload, "stream message")
    return encode_frame(Frame(stream_id, MessageType.DATA, Flags.NONE, payload))


def _data_frame_parts(stream_id: int, payload: Parts) -> Parts:
    _check_size(payload, "stream message")
    return encode_frame_parts(stream_id, MessageType.DATA, Flags.NONE, payload)


def _end_frame(stream_id: int) -> bytes:
    return encode_frame(Frame(stream_id, MessageType.DATA, _END_OF_STREAM, b""))


class ServerConnection:
    """Server side of one connection; see the module docstring."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._decoder = FrameDecoder(max_message_bytes)
        self._last_stream_id = 0
        # Streams owed an answer, and the subset on which the client still sends data.
        self._active: set[int] = set()
        self._receiving: set[int] = set()

    def is_active(self, stream_id: int) -> bool:
        return stream_id in self._active

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ServerEvent]:
        events: list[ServerEvent] = []
        for item in self._decoder.feed(data):
            if isinstance(item, FramingError):
                self._active.clear()
                self._receiving.clear()
                events.append(ConnectionBroken(item.reason))
            elif isinstance(item, OversizedFrame):
                # Lost data breaks the stream it belonged to; a lost request opened none.
                breaks_stream = item.type == MessageType.DATA
                events.append(
                    self._reject(
                        item.stream_id,
                        Code.RESOURCE_EXHAUSTED,
                        _oversized_message(item),
                        ends_stream=breaks_stream and item.stream_id in self._active,
                    )
                )
            else:
                event = self._on_frame(item)
                if event is not None:
                    events.append(event)
                    if isinstance(event, DataReceived) and item.flags & Flags.REMOTE_CLOSED:
                        # A close that is also an (empty) message: deliver, then end.
                        events.append(self._end_receiving(item.stream_id))
        return events

    def _on_frame(self, frame: Frame) -> ServerEvent | None:
        sid = frame.stream_id
        if sid % 2 != 1:
            return self._reject(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
        if frame.type == MessageType.REQUEST:
            return self._on_request(frame)
        if frame.type == MessageType.DATA:
            return self._on_data(frame)
        # Responses are not for servers, and unknown types are ignored so newer clients
        # can add them.
        return None

    def _on_request(self, frame: Frame) -> ServerEvent:
        sid = frame.stream_id
        if sid <= self._last_stream_id:
            return self._reject(
                sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
        self._last_stream_id = sid
        request = request_pb2.Request()
        try:
            request.ParseFromString(frame.payload)
        except DecodeError as exc:
            return self._reject(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        remote_open = bool(frame.flags & Flags.REMOTE_OPEN) and not (
            frame.flags & Flags.REMOTE_CLOSED
        )
        self._active.add(sid)
        if remote_open:
            self._receiving.add(sid)
        return RequestReceived(sid, request, remote_open)

    def _on_data(self, frame: Frame) -> ServerEvent | None:
        sid = frame.stream_id
        if sid not in self._receiving:
            if sid > self._last_stream_id:
                return self._reject(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
            # Data racing the answer of a finished stream, or sent to a method that takes
            # none: nobody is listening, and the client has nothing to learn from an error.
            return None
        closing = bool(frame.flags & Flags.REMOTE_CLOSED)
        if frame.flags & Flags.NO_DATA:
            return self._end_receiving(sid) if closing else None
        if closing and frame.payload:
            return self._reject(
                sid,
                Code.INVALID_ARGUMENT,
                "data close message cannot include data",
                ends_stream=True,
            )
        return DataReceived(sid, frame.payload)

    def _end_receiving(self, stream_id: int) -> StreamEnded:
        self._receiving.discard(stream_id)
        return StreamEnded(stream_id)

    def _reject(
        self, stream_id: int, code: Code, message: str, *, ends_stream: bool = False
    ) -> StreamRejected:
        # A frame that merely breaks a rule (a reused id, say) must not take down the
        # stream that legitimately holds its id.
        if ends_stream:
            self._close(stream_id)
        return StreamRejected(stream_id, code, message, ends_stream)

    def _close(self, stream_id: int) -> None:
        self._active.discard(stream_id)
        self._receiving.discard(stream_id)

    def send_response(self, stream_id: int, payload: bytes) -> bytes | None:
        """The success answer (status absent, as Go's server sends it); None if the
        stream is no longer owed one. TtrpcError if the payload is too large."""
        if stream_id not in self._active:
            return None
        _check_size(payload, "response")
        self._close(stream_id)
        response = request_pb2.Response(payload=payload)
        return self._response_frame(stream_id, response)

    def send_error(self, stream_id: int, code: Code, message: str) -> bytes | None:
        """An error answer; None if the stream is no longer owed one."""
        if stream_id not in self._active:
            return None
        self._close(stream_id)
        return self._error_frame(stream_id, code, message)

    def send_rejection(self, event: StreamRejected) -> bytes:
        """The answer to a broken rule: sent on the offending id, even one that never
        opened a stream, so the client learns which of its ids was bad."""
        return self._error_frame(event.stream_id, event.code, event.message)

    def _error_frame(self, stream_id: int, code: Code, message: str) -> bytes:
        status = status_pb2.Status(code=int(code), message=message)
        return self._response_frame(stream_id, request_pb2.Response(status=status))

    def send_data(self, stream_id: int, payload: Payload) -> Payload | None:
        """One server-stream message, in pieces if its payload is; None if the stream
        is gone."""
        if stream_id not in self._active:
            return None
        if isinstance(payload, Parts):
            return _data_frame_parts(stream_id, payload)
        return _data_frame(stream_id, payload)

    def send_end(self, stream_id: int) -> bytes | None:
        """Successful end of a server stream (what ttrpc >= 1.2 sends); None if gone."""
        if stream_id not in self._active:
            return None
        self._close(stream_id)
        return _end_frame(stream_id)

    @staticmethod
    def _response_frame(stream_id: int, response: request_pb2.Response) -> bytes:
        payload = response.SerializeToString()
        # The payload was checked, but a status message can still push it over.
        if len(payload) > MAX_MESSAGE_BYTES:
            status = status_pb2.Status(
                code=int(Code.RESOURCE_EXHAUSTED), message="response exceeds maximum size"
            )
            payload = request_pb2.Response(status=status).SerializeToString()
        return encode_frame(Frame(stream_id, MessageType.RESPONSE, Flags.NONE, payload))


class ClientConnection:
    """Client side of one connection; see the module docstring."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._decoder = FrameDecoder(max_message_bytes)
        self._next_stream_id = 1
        self._active: set[int] = set()

    def start_request(self, request: request_pb2.Request, flags: Flags) -> tuple[int, bytes]:
        """Allocates the next stream id and encodes the Request frame. The bytes must be
        sent before those of any later start_request: the server rejects ids that do
        not increase."""
        payload = request.SerializeToString()
        _check_size(payload, "request")
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED, "stream ids of this connection are used up; reconnect"
            )
        self._next_stream_id += 2
        self._active.add(sid)
        return sid, encode_frame(Frame(sid, MessageType.REQUEST, flags, payload))

    def send_data(self, stream_id: int, payload: bytes) -> bytes:
        return _data_frame(stream_id, payload)

    def send_end(self, stream_id: int) -> bytes:
        """Closes the client's sending side of a client stream."""
        return _end_frame(stream_id)

    def forget(self, stream_id: int) -> None:
        """The caller gave up on the stream; what still arrives for it is dropped."""
        self._active.discard(stream_id)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        for item in self._decoder.feed(data):
            if isinstance(item, FramingError):
                events.append(ConnectionBroken(item.reason))
            elif item.stream_id not in self._active:
                continue
            elif isinstance(item, OversizedFrame):
                self._active.discard(item.stream_id)
                events.append(
                    ResponseReceived(
                        item.stream_id, Code.RESOURCE_EXHAUSTED, _oversized_message(item), b""
                    )
                )
            elif item.type == MessageType.RESPONSE:
                self._active.discard(item.stream_id)
                events.append(self._response(item))
            elif item.type == MessageType.DATA:
                if not item.flags & Flags.NO_DATA:
                    events.append(DataReceived(item.stream_id, item.payload))
                if item.flags & Flags.REMOTE_CLOSED:
                    self._active.discard(item.stream_id)
                    events.append(StreamEnded(item.stream_id))
        return events

    @staticmethod
    def _response(frame: Frame) -> ResponseReceived:
        response = request_pb2.Response()
        try:
            response.ParseFromString(frame.payload)
        except DecodeError as exc:
            return ResponseReceived(
                frame.stream_id, Code.INTERNAL, f"ttrpc: error unmarshalling response: {exc}", b""
            )
        if not response.HasField("status") or response.status.code == Code.OK:
            return ResponseReceived(frame.stream_id, Code.OK, "", response.payload)
        status = response.status
        return ResponseReceived(frame.stream_id, Code.of(status.code), status.message, b"")
