"""The agent's output messages, encoded by hand in pieces (harpoon.agent.service
.output_chunk) so that output is not copied: byte for byte what protobuf would send."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from harpoon.agent.service import output_chunk
from harpoon.api.agent.v1 import agent_pb2

# Around each length where the varint grows a byte, and a chunk as large as one read.
BOUNDARY_LENGTHS = [0, 1, 127, 128, 129, 16383, 16384, 16385, 1 << 20, (1 << 21) + 3]


def test_every_length_boundary_matches_protobufs_encoding() -> None:
    for length in BOUNDARY_LENGTHS:
        data = bytes(range(256)) * (length // 256) + bytes(length % 256)
        parts = output_chunk(data)
        assert parts.joined() == agent_pb2.OutputChunk(data=data).SerializeToString()
        assert agent_pb2.OutputChunk.FromString(parts.joined()).data == data


def test_the_data_is_sent_as_it_is_not_copied() -> None:
    data = b"x" * 4096
    assert output_chunk(data).pieces[-1] is data


@given(st.binary(max_size=70000))
def test_any_data_round_trips(data: bytes) -> None:
    parts = output_chunk(data)
    assert parts.joined() == agent_pb2.OutputChunk(data=data).SerializeToString()
    assert len(parts) == len(parts.joined())
