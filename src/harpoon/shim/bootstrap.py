"""What `start` reads on stdin and what it prints, for containerd 1.6 through 2.3+.

Up to 2.2 stdin carries the runtime options as a google.protobuf.Any (or nothing);
2.3+ sends containerd.runtime.bootstrap.v1.BootstrapParams. Both begin with string
fields 1 and 2, so the tell is a field numbered 3 or more, or field 1 equal to the
task id. A 2.3+ containerd is answered with a BootstrapResult, every other with the
plain unix:// address, which all versions accept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from google.protobuf import any_pb2

    from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2

# Task API version announced to containerd >= 2.3 (we serve v2 and v3 alike).
ANNOUNCED_TASK_VERSION = 3


class StartInput(NamedTuple):
    # protobuf is imported only when stdin holds something to parse: `start` runs on
    # every container's critical path, and containerd before 2.3 usually sends nothing.
    params: bootstrap_pb2.BootstrapParams | None
    options: any_pb2.Any | None


def _field_numbers(data: bytes) -> list[int] | None:
    """Top-level field numbers of a protobuf message, or None if it is not one."""
    fields: list[int] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    try:
        while pos < len(data):
            key = varint()
            number, wire_type = key >> 3, key & 7
            if number == 0:
                return None
            if wire_type == 0:
                varint()
            elif wire_type == 1:
                pos += 8
            elif wire_type == 2:
                length = varint()  # read first: it advances pos
                pos += length
            elif wire_type == 5:
                pos += 4
            else:
                return None
            if pos > len(data):
                return None
            fields.append(number)
    except ValueError:
        return None
    return fields


def parse_start_stdin(data: bytes, task_id: str) -> StartInput:
    if not data:
        return StartInput(None, None)
    numbers = _field_numbers(data)
    if numbers is None:
        return StartInput(None, None)
    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    try:
        if any(n >= 3 for n in numbers):
            return _as_params(data)
        params = bootstrap_pb2.BootstrapParams.FromString(data)
        if params.instance_id == task_id:
            return _as_params(data)
        return StartInput(None, any_pb2.Any.FromString(data))
    except DecodeError:
        return StartInput(None, None)


def _as_params(data: bytes) -> StartInput:
    from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    params = bootstrap_pb2.BootstrapParams.FromString(data)
    options = params.extensions[0].value if params.extensions else None
    return StartInput(params, options)


def start_output(address: str, params: bootstrap_pb2.BootstrapParams | None) -> bytes:
    """What `start` prints: a BootstrapResult for 2.3+, else the bare address."""
    if params is None:
        return address.encode()
    from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    result = bootstrap_pb2.BootstrapResult(
        version=ANNOUNCED_TASK_VERSION, address=address, protocol="ttrpc"
    )
    return result.SerializeToString()
