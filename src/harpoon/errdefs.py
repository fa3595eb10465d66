"""containerd's error classes (errdefs), each one exception type with its ttrpc code.

Raise these from a Task or agent method and the ttrpc server answers with the class's
status code, which containerd maps back to the same errdefs class. Messages say what
was asked, what was found and, where it helps, what to do.
"""

from __future__ import annotations

from harpoon.ttrpc.status import Code, TtrpcError


class ErrdefsError(TtrpcError):
    """An error of one errdefs class. Its message ends in ": <class>", as Go's wrapped
    errdefs errors do: containerd strips that suffix and re-adds its own class, so a
    user reads the same text as from runc's shim."""

    code_class: Code = Code.UNKNOWN
    suffix = ""

    def __init__(self, message: str) -> None:
        if self.suffix and not message.endswith(f": {self.suffix}"):
            message = f"{message}: {self.suffix}"
        super().__init__(self.code_class, message)


class NotFound(ErrdefsError):
    code_class = Code.NOT_FOUND
    suffix = "not found"


class AlreadyExists(ErrdefsError):
    code_class = Code.ALREADY_EXISTS
    suffix = "already exists"


class FailedPrecondition(ErrdefsError):
    code_class = Code.FAILED_PRECONDITION
    suffix = "failed precondition"


class InvalidArgument(ErrdefsError):
    code_class = Code.INVALID_ARGUMENT
    suffix = "invalid argument"


class Unimplemented(ErrdefsError):
    code_class = Code.UNIMPLEMENTED
    suffix = "not implemented"


class Unavailable(ErrdefsError):
    code_class = Code.UNAVAILABLE
    suffix = "unavailable"


class DeadlineExceeded(ErrdefsError):
    code_class = Code.DEADLINE_EXCEEDED
    suffix = "context deadline exceeded"


class Internal(ErrdefsError):
    code_class = Code.INTERNAL
    suffix = "internal"


class Unknown(ErrdefsError):
    """What runc's shim answers when a runtime command fails (its error is a plain one,
    which errdefs sends as Unknown): a failing OCI hook, for one."""

    code_class = Code.UNKNOWN
    suffix = "unknown"
