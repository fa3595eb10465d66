"""The crashes the fuzzers found (tests/fuzz/), each with the input that found it: bad
input is refused with the errdefs class it calls for, never an unexpected exception."""

from __future__ import annotations

import pytest

from harpoon.agent.container import Container, OciProcess
from harpoon.errdefs import InvalidArgument


@pytest.mark.parametrize("root", [b"true", b'"/rootfs"', b"[1]", b"7"])
def test_a_container_spec_whose_root_is_not_an_object_is_invalid_argument(root: bytes) -> None:
    # Found by hypothesis ({"root": true}) and atheris: an AttributeError before.
    with pytest.raises(InvalidArgument, match="root that is not an object"):
        Container.parse(b'{"root": ' + root + b', "process": {"args": ["sh"]}}')


@pytest.mark.parametrize("parse", [Container.parse, OciProcess.parse])
def test_a_document_nested_deeper_than_the_parser_can_go_is_invalid_argument(
    parse: object,
) -> None:
    # Found by atheris: a RecursionError from json before.
    deep = b'{"args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        parse(deep)  # type: ignore[operator]


def test_the_input_atheris_found_the_root_crash_with_is_refused() -> None:
    from tests.fuzz import targets

    # {"path": ..., "process": ...} built into {"root": "..."} by the agent target.
    targets.agent_request(b'@=\xb0\xb7""\x7f')
