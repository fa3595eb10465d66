"""containerd's error classes (errdefs), each one exception type with its ttrpc code.

Raise these from a Task or agent method and the ttrpc server answers with the class's
status code, which containerd maps back to the same errdefs class. Messages say what
was asked, what was found and, where it helps, what to do.
"""

from __future__ import annotations

from harpoon.ttrpc.status import Code, TtrpcError


class ErrdefsError(TtrpcError):
    code_class: Code = Code.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(self.code_class, message)


class NotFound(ErrdefsError):
    code_class = Code.NOT_FOUND


class AlreadyExists(ErrdefsError):
    code_class = Code.ALREADY_EXISTS


class FailedPrecondition(ErrdefsError):
    code_class = Code.FAILED_PRECONDITION


class InvalidArgument(ErrdefsError):
    code_class = Code.INVALID_ARGUMENT


class Unimplemented(ErrdefsError):
    code_class = Code.UNIMPLEMENTED


class Unavailable(ErrdefsError):
    code_class = Code.UNAVAILABLE


class DeadlineExceeded(ErrdefsError):
    code_class = Code.DEADLINE_EXCEEDED


class Internal(ErrdefsError):
    code_class = Code.INTERNAL
