"""ttrpc framing: the 10-byte header plus payload, encoded and decoded without any I/O.

The decoder is fed whatever bytes the transport delivered, split anywhere, and returns
the frames completed so far. It must never touch sockets or asyncio, never hold more
than one frame's payload (an oversized frame is skipped as it arrives, not buffered),
and never do per-byte Python work: stdio of whole containers flows through Data frames.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Any

HEADER_BYTES = 10
MAX_MESSAGE_BYTES = 4 << 20
# The first byte of the length is reserved and always zero on the wire; a header whose
# length needs it cannot come from any ttrpc peer, so the byte stream is out of step.
_MAX_FRAMEABLE_BYTES = (1 << 24) - 1

_HEADER = struct.Struct(">IIBB")


class MessageType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(IntFlag):
    NONE = 0
    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


class Record:
    """A small immutable value: fields in ``__slots__``, compared, hashed and shown by
    them, as a frozen dataclass would be. Subclasses set their fields in ``__init__``
    with ``object.__setattr__``. Plain classes, not dataclasses: generating a
    dataclass's methods costs ~1 ms of exec() per class on import, and the guest agent
    (whose Python runs ~20x slower under TCG) imports a dozen of them at boot."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of {type(self).__name__}")


_set = object.__setattr__


class Frame(Record):
    """One message on the wire. ``type`` is a plain int for types this version does not
    know (peers must ignore them, for forward compatibility)."""

    __slots__ = ("stream_id", "type", "flags", "payload")  # noqa: RUF023 (field order)
    stream_id: int
    type: MessageType | int
    flags: Flags
    payload: bytes

    def __init__(
        self, stream_id: int, type: MessageType | int, flags: Flags, payload: bytes
    ) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "type", type)
        _set(self, "flags", flags)
        _set(self, "payload", payload)


class OversizedFrame(Record):
    """A frame whose declared payload exceeded the limit; its payload was skipped."""

    __slots__ = ("stream_id", "type", "length")  # noqa: RUF023 (field order)
    stream_id: int
    type: MessageType | int
    length: int

    def __init__(self, stream_id: int, type: MessageType | int, length: int) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "type", type)
        _set(self, "length", length)


class FramingError(Record):
    """The byte stream cannot be split into frames any more; the connection is useless.
    Always the last event a decoder returns."""

    __slots__ = ("reason",)
    reason: str

    def __init__(self, reason: str) -> None:
        _set(self, "reason", reason)


Event = Frame | OversizedFrame | FramingError


class Parts(Record):
    """Bytes to send as pieces, one after another, never joined into one object: how a
    large stream message (a container's output) leaves the guest agent without being
    copied on the way (a copy of 1 MiB costs ~5 ms of an emulated guest's CPU). Channel
    hands them to its transport's writelines; asyncio's socket transports join them
    there, the agent's port transport writes them with writev(2)."""

    __slots__ = ("pieces",)
    pieces: tuple[bytes | memoryview, ...]

    def __init__(self, *pieces: bytes | memoryview) -> None:
        _set(self, "pieces", pieces)

    def __len__(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def joined(self) -> bytes:
        return b"".join(self.pieces)


#: A message's encoded form, whole or in pieces.
Payload = bytes | Parts


def encode_header(
    stream_id: int, message_type: MessageType | int, flags: Flags | int, length: int
) -> bytes:
    """The 10-byte header; ValueError if ``length`` exceeds MAX_MESSAGE_BYTES."""
    if length > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"ttrpc message of {length} bytes exceeds the maximum of {MAX_MESSAGE_BYTES} bytes"
        )
    return _HEADER.pack(length, stream_id, int(message_type), int(flags))


def encode_frame(frame: Frame) -> bytes:
    """The frame's bytes; ValueError if the payload exceeds MAX_MESSAGE_BYTES."""
    header = encode_header(frame.stream_id, frame.type, frame.flags, len(frame.payload))
    return header + frame.payload


def encode_frame_parts(
    stream_id: int, message_type: MessageType, flags: Flags, payload: Parts
) -> Parts:
    """encode_frame for a payload in pieces: the header, then the pieces, not joined."""
    return Parts(encode_header(stream_id, message_type, flags, len(payload)), *payload.pieces)


# A frame's header as decoded: payload length, stream id, type, flags.
_Header = tuple[int, int, MessageType | int, Flags]


class FrameDecoder:
    """Turns a byte stream into frames; see the module docstring."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._max_message_bytes = max_message_bytes
        # Holds either a partial header or a partial payload, never both.
        self._buffer = bytearray()
        self._header: _Header | None = None
        self._discard_bytes = 0
        self._broken = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an incomplete frame (what a peer can make us store)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._broken:
            return []
        events: list[Event] = []
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while True:
            if self._discard_bytes:
                pos = self._skip_discarded(view, pos, end)
                if self._discard_bytes:
                    break
            if self._header is None:
                pos, event = self._read_header(view, pos, end)
                if event is not None:
                    events.append(event)
                    if self._broken:
                        return events
                    continue  # an oversized frame: its payload is skipped next
            header = self._header
            if header is None:
                break  # the header is incomplete
            pos, frame = self._read_payload(header, view, pos, end)
            if frame is None:
                break  # the payload is incomplete
            events.append(frame)
        return events

    def _skip_discarded(self, view: memoryview, pos: int, end: int) -> int:
        """Skips what of an oversized frame's payload view[pos:end] holds; the new pos."""
        skipped = min(self._discard_bytes, end - pos)
        self._discard_bytes -= skipped
        return pos + skipped

    def _read_header(self, view: memoryview, pos: int, end: int) -> tuple[int, Event | None]:
        """Reads a header from view[pos:end], or buffers what there is of one; the new pos.
        Sets self._header for a frame whose payload comes next; answers the event instead
        when the frame will not be delivered (oversized, or the stream is out of step)."""
        buffer = self._buffer
        needed = HEADER_BYTES - len(buffer)
        if end - pos < needed:
            buffer += view[pos:end]
            return end, None
        if buffer:
            buffer += view[pos : pos + needed]
            fields = _HEADER.unpack(buffer)
            buffer.clear()
        else:
            fields = _HEADER.unpack_from(view, pos)
        pos += needed
        length, stream_id, raw_type, raw_flags = fields
        type_ = MessageType(raw_type) if raw_type in _KNOWN_TYPES else raw_type
        if length > _MAX_FRAMEABLE_BYTES:
            self._broken = True
            return pos, FramingError(f"frame length {length} uses the reserved length byte")
        if length > self._max_message_bytes:
            self._discard_bytes = length
            return pos, OversizedFrame(stream_id, type_, length)
        self._header = (length, stream_id, type_, Flags(raw_flags))
        return pos, None

    def _read_payload(
        self, header: _Header, view: memoryview, pos: int, end: int
    ) -> tuple[int, Frame | None]:
        """Reads the payload of the frame whose header came, or buffers what there is of
        it; the new pos, and the frame once it is whole."""
        length, stream_id, type_, flags = header
        buffer = self._buffer
        if not buffer and end - pos >= length:
            # Whole payload in this chunk: one copy, no staging.
            payload = bytes(view[pos : pos + length])
            pos += length
        else:
            take = min(length - len(buffer), end - pos)
            buffer += view[pos : pos + take]
            pos += take
            if len(buffer) < length:
                return pos, None
            payload = bytes(buffer)
            buffer.clear()
        self._header = None
        return pos, Frame(stream_id, type_, flags, payload)
