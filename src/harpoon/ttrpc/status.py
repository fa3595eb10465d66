"""gRPC status codes and the exceptions that carry them across a ttrpc call.

ttrpc reports every failure as a ``google.rpc.Status``; this module is the one place
where that status becomes a Python exception and back. It must never import asyncio or
sockets: the codec and the state machines use it too. The status message's module is
imported only when a status is converted: the shim's path to launching a VM raises and
catches these errors but sends none, and protobuf is not loaded by then.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harpoon.api.google.rpc import status_pb2


class Code(IntEnum):
    """The gRPC status codes, as ttrpc and containerd use them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def of(cls, value: int) -> Code:
        """The code for a wire value; codes this module does not know read as UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TtrpcError(Exception):
    """A call failed with a non-OK status.

    Raised by clients when the server answers with an error, and raised by handlers to
    answer with a specific code (anything else a handler raises is sent as UNKNOWN).
    """

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def to_status(self) -> status_pb2.Status:
        from harpoon.api.google.rpc import status_pb2

        return status_pb2.Status(code=int(self.code), message=self.message)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> TtrpcError:
        return cls(Code.of(status.code), status.message)


class ConnectionClosedError(TtrpcError):
    """The connection closed before the call was answered (code UNAVAILABLE)."""

    def __init__(self, message: str = "ttrpc: connection closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)
