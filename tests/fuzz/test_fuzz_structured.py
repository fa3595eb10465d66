"""Fuzzing with structure (hypothesis), where random bytes would rarely reach the code:
well-formed frames in any order with any ids and flags for the ttrpc state machines,
JSON documents with any value at the keys the agent reads, BootstrapParams and
DeleteResponses made by the generated classes for the shim's hand-written wire code.
What counts as a crash is the byte-level targets' (tests/fuzz/targets.py)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from harpoon.agent.container import Container, OciProcess
from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from harpoon.api.containerd.task.v2 import shim_pb2
from harpoon.api.ttrpc import request_pb2
from harpoon.errdefs import InvalidArgument
from harpoon.shim import bootstrap
from harpoon.shim.cleanup import delete_response
from harpoon.ttrpc.codec import Flags, Frame, encode_frame
from tests.fuzz import targets

EXAMPLES = 300
fuzz_settings = settings(max_examples=EXAMPLES, deadline=None)

_request_payloads = st.one_of(
    st.builds(
        lambda service, method, payload: request_pb2.Request(
            service=service, method=method, payload=payload
        ).SerializeToString(),
        st.text(max_size=8),
        st.text(max_size=8),
        st.binary(max_size=16),
    ),
    st.binary(max_size=24),
)
_frames = st.builds(
    Frame,
    stream_id=st.one_of(st.integers(0, 12), st.just(2**32 - 1)),
    type=st.integers(0, 5),
    flags=st.builds(Flags, st.integers(0, 255)),
    payload=_request_payloads,
)
_streams = st.lists(_frames, max_size=12).map(lambda fs: b"".join(encode_frame(f) for f in fs))
# The targets' control byte (tests/fuzz/targets.py, _split): how many chunk sizes follow
# (low bits) and, for the client, how many calls it started (bits 4-6).
_controls = st.builds(
    lambda control, sizes: bytes([control & 0xF0 | len(sizes), *sizes]),
    st.integers(0, 255),
    st.lists(st.integers(0, 255), max_size=15),
)


@fuzz_settings
@given(control=_controls, stream=_streams)
def test_a_server_answers_any_sequence_of_frames_with_events(control: bytes, stream: bytes) -> None:
    targets.protocol_server(control + stream)


@fuzz_settings
@given(control=_controls, stream=_streams)
def test_a_client_answers_any_sequence_of_frames_with_events(control: bytes, stream: bytes) -> None:
    targets.protocol_client(control + stream)


# Any JSON value, and the shapes the agent reads, with any JSON value at each key.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
_strings = st.lists(st.text(max_size=8), max_size=3)
_process = st.fixed_dictionaries(
    {},
    optional={"args": _strings | _json, "env": _strings | _json, "cwd": st.text() | _json},
)
_spec = st.fixed_dictionaries(
    {},
    optional={
        "root": st.fixed_dictionaries({}, optional={"path": st.text() | _json}) | _json,
        "process": _process | _json,
        "hooks": st.fixed_dictionaries({}, optional={"poststart": _json}) | _json,
    },
)


def _parsed_or_invalid(parse: Any, document: object) -> None:
    """parse answers a process or InvalidArgument, nothing else."""
    try:
        parsed = parse(json.dumps(document).encode())
    except InvalidArgument:
        return
    process = parsed.process if isinstance(parsed, Container) else parsed
    assert all(isinstance(arg, str) for arg in process.args)
    assert all(isinstance(entry, str) for entry in process.env)
    assert isinstance(process.cwd, str)


@fuzz_settings
@given(document=_spec | _json)
def test_a_container_spec_of_any_shape_parses_or_is_invalid_argument(document: object) -> None:
    _parsed_or_invalid(Container.parse, document)


@fuzz_settings
@given(document=_process | _json)
def test_an_exec_process_of_any_shape_parses_or_is_invalid_argument(document: object) -> None:
    _parsed_or_invalid(OciProcess.parse, document)


_texts = st.text(max_size=40)
_anys = st.builds(
    lambda type_url, value: bootstrap_pb2.Extension(
        value={"type_url": type_url, "value": value}  # type: ignore[arg-type]
    ),
    _texts,
    st.binary(max_size=20),
)
_params = st.builds(
    bootstrap_pb2.BootstrapParams,
    # containerd's instance id is the task id `start` is run with: what tells 2.3+ apart.
    instance_id=st.text(min_size=1, max_size=40),
    namespace=_texts,
    log_level=st.sampled_from(list(bootstrap_pb2.LogLevel.values())),
    containerd_version=_texts,
    containerd_ttrpc_address=_texts,
    containerd_grpc_address=_texts,
    containerd_binary=_texts,
    extensions=st.lists(_anys | st.just(bootstrap_pb2.Extension()), max_size=3),
    socket_dir=st.none() | _texts,
)


@fuzz_settings
@given(message=_params)
def test_any_bootstrap_params_read_by_hand_as_the_generated_class_reads_them(
    message: bootstrap_pb2.BootstrapParams,
) -> None:
    data = message.SerializeToString()
    targets.shim_start(data)  # no crash, and the same values as protobuf's
    parsed = bootstrap.parse_start_stdin(data, message.instance_id)
    assert parsed.params == bootstrap.decode_params(data)


@fuzz_settings
@given(
    pid=st.integers(0, 2**32 - 1),
    exit_status=st.integers(0, 2**32 - 1),
    exited_at_ns=st.integers(0, 2**63 - 1),
)
def test_any_delete_response_written_by_hand_is_what_the_generated_class_reads(
    pid: int, exit_status: int, exited_at_ns: int
) -> None:
    message = shim_pb2.DeleteResponse.FromString(delete_response(pid, exit_status, exited_at_ns))
    assert (message.pid, message.exit_status) == (pid, exit_status)
    assert message.exited_at.ToNanoseconds() == exited_at_ns
