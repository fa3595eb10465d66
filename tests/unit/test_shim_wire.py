"""The messages `shim start` and `shim delete` read and write by hand (harpoon.shim.wire)
are byte for byte what the generated protobuf classes read and write."""

from __future__ import annotations

import time

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from harpoon.api.containerd.task.v2 import shim_pb2
from harpoon.api.containerd.task.v3 import shim_pb2 as shim_v3_pb2
from harpoon.shim import wire
from harpoon.shim.bootstrap import (
    AnyMessage,
    decode_params,
    encode_result,
    parse_start_stdin,
)
from harpoon.shim.cleanup import delete_response
from tests.wire_oracle import params_read_by_protobuf

LONG = "x" * 300  # a length that needs a two-byte varint


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1, -8])
def test_varints_match_protobufs(value: int) -> None:
    # An int64 field of a Timestamp holds any of these; a zero is left out in proto3.
    expected = timestamp_pb2.Timestamp(seconds=value).SerializeToString()
    assert wire.varint_field(1, value) == expected


@pytest.mark.parametrize(
    "address",
    ["unix:///run/containerd/s/" + "a" * 64, "unix:///x", f"unix:///{LONG}", ""],
)
def test_bootstrap_result_is_what_the_generated_class_writes(address: str) -> None:
    generated = bootstrap_pb2.BootstrapResult(version=3, address=address, protocol="ttrpc")
    assert encode_result(address) == generated.SerializeToString()
    parsed = bootstrap_pb2.BootstrapResult.FromString(encode_result(address))
    assert (parsed.version, parsed.address, parsed.protocol) == (3, address, "ttrpc")


PARAMS = [
    bootstrap_pb2.BootstrapParams(),
    bootstrap_pb2.BootstrapParams(instance_id="c1", namespace="default"),
    bootstrap_pb2.BootstrapParams(
        instance_id="c1",
        namespace="k8s.io",
        log_level=bootstrap_pb2.DEBUG,  # negative: a ten-byte varint
        containerd_version="v2.3.7",
        containerd_ttrpc_address="/run/containerd/containerd.sock.ttrpc",
        containerd_grpc_address="/run/containerd/containerd.sock",
        containerd_binary="/usr/bin/containerd",
        extensions=[
            bootstrap_pb2.Extension(
                value=any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\x0a\x02ab")
            ),
            bootstrap_pb2.Extension(),
        ],
        socket_dir="",  # present although empty
    ),
    bootstrap_pb2.BootstrapParams(instance_id=LONG, socket_dir="/run/s", log_level=12),
]


@pytest.mark.parametrize("message", PARAMS)
def test_bootstrap_params_read_as_the_generated_class_reads_them(
    message: bootstrap_pb2.BootstrapParams,
) -> None:
    assert decode_params(message.SerializeToString()) == params_read_by_protobuf(message)


def test_unknown_fields_of_a_newer_containerd_are_skipped() -> None:
    known = PARAMS[2].SerializeToString()
    newer = known + wire.varint_field(40, 7) + wire.bytes_field(41, "later") + b"\x5d\0\0\0\0"
    parsed = bootstrap_pb2.BootstrapParams.FromString(newer)
    assert (
        decode_params(newer)
        == params_read_by_protobuf(parsed)
        == params_read_by_protobuf(PARAMS[2])
    )


def test_start_input_tells_params_from_options_as_before() -> None:
    params = PARAMS[2].SerializeToString()
    parsed = parse_start_stdin(params, "c1")
    assert parsed.params == params_read_by_protobuf(PARAMS[2])
    assert parsed.options == AnyMessage("runtimeoptions.v1.Options", b"\x0a\x02ab")
    # An Any whose value is not text: field 2 is bytes there, not a namespace.
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\xff\xfe")
    parsed = parse_start_stdin(options.SerializeToString(), "c1")
    assert parsed.params is None
    assert parsed.options == AnyMessage("runtimeoptions.v1.Options", b"\xff\xfe")


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\x0a\x05ab", b"\x00", b"\x0f", b"\x0a\x02\xff\xfe", b"\x80\x80\x80\x80\x10\x00"],
)
def test_broken_input_is_no_input(data: bytes) -> None:
    assert parse_start_stdin(data, "c1") == (None, None)


@pytest.mark.parametrize("pid,status", [(0, 0), (4242, 137), (2**32 - 1, 255)])
def test_delete_response_is_what_the_generated_classes_write(pid: int, status: int) -> None:
    now = time.time_ns()
    ours = delete_response(pid, status, now)
    for module in (shim_pb2, shim_v3_pb2):
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(now)
        generated = module.DeleteResponse(pid=pid, exit_status=status, exited_at=stamp)
        assert ours == generated.SerializeToString()
    parsed = shim_pb2.DeleteResponse.FromString(ours)
    assert parsed.exited_at.ToNanoseconds() == now
