"""The protobuf wire format by hand, for the few small messages of `shim start` and
`shim delete`.

Both run once per container on containerd's critical path, in a fresh Python: importing
protobuf and the generated modules costs more there than everything else they do. So they
read BootstrapParams and write BootstrapResult and DeleteResponse with these helpers,
and tests/unit/test_shim_wire.py holds every message to the generated classes, byte for
byte. Anything bigger or less fixed belongs to protobuf proper.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's, nor collections.abc: `delete` imports this
if TYPE_CHECKING:
    from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5

_UINT64 = 1 << 64


class WireError(ValueError):
    """The bytes are not a protobuf message."""


def encode_varint(value: int) -> bytes:
    """A varint; negative values as their 64-bit two's complement (int32/int64/enum)."""
    if value < 0:
        value += _UINT64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """A varint field; proto3 leaves out a zero."""
    return encode_varint(number << 3 | VARINT) + encode_varint(value) if value else b""


def bytes_field(number: int, value: bytes | str) -> bytes:
    """A length-delimited field (string, bytes, message); proto3 leaves out an empty one."""
    raw = value.encode() if isinstance(value, str) else value
    if not raw:
        return b""
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(raw)) + raw


def message_field(number: int, value: bytes) -> bytes:
    """A sub-message field: present (even when empty) once set."""
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(value)) + value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & (_UINT64 - 1), pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(number, wire type, value) of every top-level field: an int for a varint or a
    fixed field, the raw bytes for a length-delimited one. Raises WireError."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0 or key > 0xFFFF_FFFF:  # a key is a uint32, as protobuf reads it
            raise WireError(f"bad field number {number}")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = _varint(data, pos)
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > len(data):
                raise WireError("truncated fixed field")
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        elif wire_type == LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise WireError("truncated length-delimited field")
            value = data[pos : pos + length]
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        yield number, wire_type, value


def as_signed32(value: int) -> int:
    """An int32 or enum read as a varint (negative ones arrive as 64-bit)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise WireError("a string field is not UTF-8") from None


def timestamp(nanoseconds: int) -> bytes:
    """A google.protobuf.Timestamp."""
    seconds, nanos = divmod(nanoseconds, 1_000_000_000)
    return varint_field(1, seconds) + varint_field(2, nanos)
