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


def test_an_extension_whose_any_is_given_twice_reads_as_protobuf_merges_it() -> None:
    """Found by the long run of the shim_start target: an Extension message whose `value`
    field occurs twice is one Any, the merge of both (protobuf's reading); the hand-written
    reader took the last occurrence alone, dropping the first one's type_url."""
    from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
    from harpoon.shim import bootstrap

    data = (
        b"u\nPPPB(\x08\x08\n\x18\x08\x08\xa8\x08\x18\x18\x18\x98\x18\x18\x18\x18("
        b"\x08\n\x08\x18\x08\x08\x08\x08\x08(\x08\n\x08\x18\x08\x08\x08\x08\x08"
        b"\x08\x18PP\x08t"
    )
    ours = bootstrap.decode_params(data).extensions
    theirs = bootstrap_pb2.BootstrapParams.FromString(data).extensions
    assert [(e.type_url, e.value) for e in ours] == [
        (e.value.type_url, e.value.value) for e in theirs
    ]
    assert ours[0].type_url == "\x18\x08\x08\x08\x08\x08(\x08"
