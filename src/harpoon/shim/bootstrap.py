"""What `start` reads on stdin and what it prints, for containerd 1.6 through 2.3+.

Up to 2.2 stdin carries the runtime options as a google.protobuf.Any (or nothing);
2.3+ sends containerd.runtime.bootstrap.v1.BootstrapParams. Both begin with string
fields 1 and 2, so the tell is a field numbered 3 or more, or field 1 equal to the
task id. A 2.3+ containerd is answered with a BootstrapResult, every other with the
plain unix:// address, which all versions accept.

`start` runs on every container's critical path, so these messages are read and written
by hand (harpoon.shim.wire), without importing protobuf; tests/unit/test_shim_wire.py
checks them against the generated classes (harpoon.api.containerd.runtime.bootstrap.v1).
"""

from __future__ import annotations

from harpoon.shim import wire

# Task API version announced to containerd >= 2.3 (we serve v2 and v3 alike).
ANNOUNCED_TASK_VERSION = 3
PROTOCOL = "ttrpc"


class _Value:
    """Equality and repr from the attributes (typing.NamedTuple and dataclasses would
    cost `start` their imports)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(self) == vars(other)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class AnyMessage(_Value):
    """A google.protobuf.Any: the runtime options containerd passes."""

    def __init__(self, type_url: str = "", value: bytes = b"") -> None:
        self.type_url = type_url
        self.value = value


class BootstrapParams(_Value):
    """containerd.runtime.bootstrap.v1.BootstrapParams (field numbers in comments)."""

    def __init__(
        self,
        instance_id: str = "",  # 1
        namespace: str = "",  # 2
        log_level: int = 0,  # 3, LogLevel
        containerd_version: str = "",  # 4
        containerd_ttrpc_address: str = "",  # 5
        containerd_grpc_address: str = "",  # 6
        containerd_binary: str = "",  # 7
        extensions: tuple[AnyMessage, ...] = (),  # 8, Extension{Any value = 1}
        socket_dir: str | None = None,  # 9, optional: None when absent
    ) -> None:
        self.instance_id = instance_id
        self.namespace = namespace
        self.log_level = log_level
        self.containerd_version = containerd_version
        self.containerd_ttrpc_address = containerd_ttrpc_address
        self.containerd_grpc_address = containerd_grpc_address
        self.containerd_binary = containerd_binary
        self.extensions = extensions
        self.socket_dir = socket_dir


class StartInput(tuple):  # type: ignore[type-arg]
    """(params, options): BootstrapParams from containerd 2.3+, the runtime options."""

    def __new__(cls, params: BootstrapParams | None, options: AnyMessage | None) -> StartInput:
        return super().__new__(cls, (params, options))

    @property
    def params(self) -> BootstrapParams | None:
        value: BootstrapParams | None = self[0]
        return value

    @property
    def options(self) -> AnyMessage | None:
        value: AnyMessage | None = self[1]
        return value


_STRING_FIELDS = {
    1: "instance_id",
    2: "namespace",
    4: "containerd_version",
    5: "containerd_ttrpc_address",
    6: "containerd_grpc_address",
    7: "containerd_binary",
    9: "socket_dir",
}


def _any(data: bytes) -> AnyMessage:
    type_url, value = "", b""
    for number, wire_type, field in wire.fields(data):
        if wire_type != wire.LENGTH_DELIMITED:
            continue
        assert isinstance(field, bytes)
        if number == 1:
            type_url = wire.text(field)
        elif number == 2:
            value = field
    return AnyMessage(type_url, value)


def decode_params(data: bytes) -> BootstrapParams:
    """BootstrapParams from its wire form (unknown fields skipped); raises WireError."""
    values: dict[str, object] = {}
    extensions: list[AnyMessage] = []
    for number, wire_type, field in wire.fields(data):
        if number in _STRING_FIELDS and wire_type == wire.LENGTH_DELIMITED:
            assert isinstance(field, bytes)
            values[_STRING_FIELDS[number]] = wire.text(field)
        elif number == 3 and wire_type == wire.VARINT:
            assert isinstance(field, int)
            values["log_level"] = wire.as_signed32(field)
        elif number == 8 and wire_type == wire.LENGTH_DELIMITED:
            assert isinstance(field, bytes)
            # A message field given more than once is the merge of its occurrences, as
            # protobuf reads it: their encodings, concatenated.
            occurrences = [
                payload
                for inner, inner_type, payload in wire.fields(field)
                if inner == 1 and inner_type == wire.LENGTH_DELIMITED
            ]
            extensions.append(_any(b"".join(occurrences)))  # type: ignore[arg-type]
    return BootstrapParams(**values, extensions=tuple(extensions))  # type: ignore[arg-type]


def parse_start_stdin(data: bytes, task_id: str) -> StartInput:
    if not data:
        return StartInput(None, None)
    try:
        top = list(wire.fields(data))
        first: int | bytes = b""
        for number, _, value in top:
            if number == 1:
                first = value  # the last one wins, as in protobuf
        if any(number >= 3 for number, _, _ in top) or first == task_id.encode():
            params = decode_params(data)
            options = params.extensions[0] if params.extensions else None
            return StartInput(params, options)
        return StartInput(None, _any(data))
    except wire.WireError:
        return StartInput(None, None)


def encode_result(address: str) -> bytes:
    """containerd.runtime.bootstrap.v1.BootstrapResult{version, address, protocol}."""
    return (
        wire.varint_field(1, ANNOUNCED_TASK_VERSION)
        + wire.bytes_field(2, address)
        + wire.bytes_field(3, PROTOCOL)
    )


def start_output(address: str, params: BootstrapParams | None) -> bytes:
    """What `start` prints: a BootstrapResult for 2.3+, else the bare address."""
    if params is None:
        return address.encode()
    return encode_result(address)
