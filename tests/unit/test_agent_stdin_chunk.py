"""StdinChunk decoded by hand in the agent (harpoon.agent.service.stdin_chunk), so that
a container's stdin reaches its pipe as views of the messages received, not copies:
exactly what protobuf's parse finds, for any message a host may send."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from harpoon.agent.service import stdin_chunk
from harpoon.api.agent.v1 import agent_pb2
from harpoon.errdefs import InvalidArgument


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, wire_type: int, value: bytes | int) -> bytes:
    key = varint(number << 3 | wire_type)
    if wire_type == 0:
        assert isinstance(value, int)
        return key + varint(value)
    assert isinstance(value, bytes)
    return key + (varint(len(value)) + value if wire_type == 2 else value)


# Fields as a host's protobuf may write them: id and data (repeated: the last one wins),
# and fields of later versions of the message, unknown here, of every scalar wire type.
FIELDS = st.one_of(
    st.text(max_size=20).map(lambda text: field(1, 2, text.encode())),
    st.binary(max_size=300).map(lambda data: field(2, 2, data)),
    st.tuples(st.integers(3, 1 << 20), st.integers(0, (1 << 64) - 1)).map(
        lambda item: field(item[0], 0, item[1])
    ),
    st.tuples(st.integers(3, 1 << 20), st.binary(min_size=8, max_size=8)).map(
        lambda item: field(item[0], 1, item[1])
    ),
    st.tuples(st.integers(3, 1 << 20), st.binary(min_size=4, max_size=4)).map(
        lambda item: field(item[0], 5, item[1])
    ),
    st.tuples(st.integers(3, 1 << 20), st.binary(max_size=40)).map(
        lambda item: field(item[0], 2, item[1])
    ),
)


def parsed(payload: bytes) -> tuple[str, bytes]:
    chunk = agent_pb2.StdinChunk.FromString(payload)
    return chunk.id, chunk.data


def test_protobuf_s_own_encoding_decodes_to_the_same_fields() -> None:
    for length in (0, 1, 127, 128, 16384, 1 << 20):
        payload = agent_pb2.StdinChunk(id="exec-1", data=b"\x01" * length).SerializeToString()
        process_id, data = stdin_chunk(payload)
        assert (process_id, bytes(data)) == ("exec-1", b"\x01" * length)


def test_the_data_is_a_view_of_the_message_not_a_copy() -> None:
    payload = agent_pb2.StdinChunk(data=b"x" * 4096).SerializeToString()
    _, data = stdin_chunk(payload)
    assert isinstance(data, memoryview) and data.obj is payload


@given(st.lists(FIELDS, max_size=8))
def test_any_message_decodes_as_protobuf_parses_it(fields: list[bytes]) -> None:
    payload = b"".join(fields)
    process_id, data = stdin_chunk(payload)
    assert (process_id, bytes(data)) == parsed(payload)


@given(st.binary(max_size=64))
def test_what_it_accepts_protobuf_accepts_alike(payload: bytes) -> None:
    """Bytes that are no StdinChunk are refused (protobuf refuses them too, or they hold
    a group, which no host sends); what is accepted is what protobuf finds."""
    try:
        process_id, data = stdin_chunk(payload)
    except InvalidArgument:
        return
    assert (process_id, bytes(data)) == parsed(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x12\x05abc",  # data longer than the message
        b"\x12",  # a length missing
        b"\x0a\x02\xff\xfe",  # an id that is not UTF-8
        b"\x00\x01",  # field number 0
        b"\x19\x01\x02",  # a fixed64 cut short
        b"\x18" + b"\xff" * 11,  # a varint of more than ten bytes
        b"\x80\x80\x80\x80\x10\x00",  # a key past 32 bits (found by hypothesis)
    ],
)
def test_malformed_messages_are_refused_as_protobuf_refuses_them(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        parsed(payload)
    with pytest.raises(InvalidArgument):
        stdin_chunk(payload)
