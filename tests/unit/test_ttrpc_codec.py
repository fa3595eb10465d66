"""ttrpc framing: what goes on the wire, and decoding it from any split of the stream."""

from __future__ import annotations

import itertools
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harpoon.ttrpc.codec import (
    HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    Flags,
    Frame,
    FrameDecoder,
    FramingError,
    MessageType,
    OversizedFrame,
    encode_frame,
)

pytestmark = pytest.mark.timeout(30)


def test_header_layout_matches_the_protocol() -> None:
    frame = Frame(0x01020305, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"xyz")
    assert encode_frame(frame) == b"\x00\x00\x00\x03" + b"\x01\x02\x03\x05" + b"\x03\x05xyz"
    assert HEADER_BYTES == 10 and MAX_MESSAGE_BYTES == 4 * 1024 * 1024


def test_round_trip_of_one_frame() -> None:
    frame = Frame(7, MessageType.REQUEST, Flags.REMOTE_OPEN, b"\x00payload\xff")
    assert FrameDecoder().feed(encode_frame(frame)) == [frame]


def test_empty_payload_is_a_frame() -> None:
    frame = Frame(1, MessageType.DATA, Flags.NONE, b"")
    assert FrameDecoder().feed(encode_frame(frame)) == [frame]


def test_payload_at_the_limit_is_accepted_and_one_byte_more_refused() -> None:
    frame = Frame(1, MessageType.DATA, Flags.NONE, bytes(MAX_MESSAGE_BYTES))
    assert FrameDecoder().feed(encode_frame(frame)) == [frame]
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(Frame(1, MessageType.DATA, Flags.NONE, bytes(MAX_MESSAGE_BYTES + 1)))


def test_unknown_message_type_is_decoded_not_refused() -> None:
    raw = struct.pack(">IIBB", 2, 3, 0x7F, 0x80) + b"hi"
    [frame] = FrameDecoder().feed(raw)
    assert isinstance(frame, Frame)
    assert (frame.stream_id, frame.type, int(frame.flags), frame.payload) == (3, 0x7F, 0x80, b"hi")


def test_truncated_input_yields_nothing_until_complete() -> None:
    data = encode_frame(Frame(9, MessageType.RESPONSE, Flags.NONE, b"0123456789"))
    decoder = FrameDecoder()
    for byte in data[:-1]:
        assert decoder.feed(bytes([byte])) == []
    assert decoder.feed(data[-1:]) == [Frame(9, MessageType.RESPONSE, Flags.NONE, b"0123456789")]
    assert decoder.buffered_bytes == 0


def test_oversized_frame_is_reported_at_its_header_and_skipped_without_buffering() -> None:
    length = MAX_MESSAGE_BYTES + 1
    decoder = FrameDecoder()
    header = struct.pack(">IIBB", length, 5, MessageType.REQUEST, 0)
    assert decoder.feed(header) == [OversizedFrame(5, MessageType.REQUEST, length)]
    chunk = bytes(64 * 1024)
    sent = 0
    while sent + len(chunk) <= length:
        assert decoder.feed(chunk) == []
        assert decoder.buffered_bytes == 0
        sent += len(chunk)
    after = Frame(7, MessageType.REQUEST, Flags.NONE, b"next")
    # The rest of the oversized payload and the next frame arrive together.
    assert decoder.feed(bytes(length - sent) + encode_frame(after)) == [after]


def test_length_using_the_reserved_byte_breaks_framing_for_good() -> None:
    decoder = FrameDecoder()
    good = Frame(1, MessageType.REQUEST, Flags.NONE, b"ok")
    events = decoder.feed(encode_frame(good) + b"\xffgarbage that is not a frame")
    assert events[0] == good
    assert isinstance(events[1], FramingError) and len(events) == 2
    assert decoder.feed(encode_frame(good)) == []


def test_decoding_many_megabytes_in_small_chunks_is_linear() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = b"".join(
        encode_frame(Frame(1, MessageType.DATA, Flags.NONE, payload)) for _ in range(32)
    )
    decoder = FrameDecoder()
    started = time.perf_counter()
    frames = []
    for offset in range(0, len(stream), 16 * 1024):
        frames += decoder.feed(stream[offset : offset + 16 * 1024])
    elapsed = time.perf_counter() - started
    assert len(frames) == 32
    assert all(isinstance(f, Frame) and f.payload == payload for f in frames)
    # 32 MiB in 2048 chunks; quadratic re-slicing would take many seconds.
    assert elapsed < 2.0


frames_strategy = st.lists(
    st.builds(
        Frame,
        stream_id=st.integers(0, 2**32 - 1),
        type=st.sampled_from(list(MessageType)),
        flags=st.sampled_from([Flags(v) for v in range(8)]),
        payload=st.binary(max_size=300),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 4000), max_size=30))
def test_any_split_of_encoded_frames_decodes_to_the_same_frames(
    frames: list[Frame], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    decoded = []
    for start, end in itertools.pairwise(points):
        decoded += decoder.feed(stream[start:end])
    assert decoded == frames
    assert decoder.buffered_bytes == 0


@settings(max_examples=300, deadline=None)
@given(frames=frames_strategy, data=st.data())
def test_oversized_frames_between_good_ones_are_reported_in_order(
    frames: list[Frame], data: st.DataObject
) -> None:
    # A small limit keeps examples small; the decoder treats every limit alike.
    limit = 300
    oversized_at = data.draw(st.integers(0, len(frames)))
    length = limit + data.draw(st.integers(1, 5000))
    oversized = struct.pack(">IIBB", length, 3, MessageType.DATA, 0) + bytes(length)
    parts = [encode_frame(f) for f in frames]
    parts.insert(oversized_at, oversized)
    stream = b"".join(parts)
    decoder = FrameDecoder(max_message_bytes=limit)
    decoded = []
    step = data.draw(st.integers(1, 2000))
    for offset in range(0, len(stream), step):
        decoded += decoder.feed(memoryview(stream)[offset : offset + step])
        assert decoder.buffered_bytes <= limit
    expected: list[object] = list(frames)
    expected.insert(oversized_at, OversizedFrame(3, MessageType.DATA, length))
    assert decoded == expected
