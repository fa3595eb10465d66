"""The container's OCI documents parsed once (harpoon.agent.container)."""

from __future__ import annotations

import json

import pytest

from harpoon.agent.container import Container, OciProcess
from harpoon.errdefs import InvalidArgument


def test_a_container_spec_is_read_into_its_root_process_and_hooks() -> None:
    config = {
        "root": {"path": "/run/harpoon/rootfs", "readonly": True},
        "process": {"args": ["/bin/sh", "-c", "true"], "env": ["PATH=/bin"], "cwd": "/tmp"},
        "hooks": {"poststart": [{"path": "/bin/true"}]},
    }
    container = Container.parse(json.dumps(config).encode())
    assert container.root == "/run/harpoon/rootfs"
    assert container.process.args == ["/bin/sh", "-c", "true"]
    assert (container.process.env, container.process.cwd) == (["PATH=/bin"], "/tmp")
    assert container.poststart_hooks is True
    assert container.config == config  # whole, for crun


def test_an_exec_process_keeps_its_document_and_defaults_its_cwd() -> None:
    document = {"args": ["ls"], "user": {"uid": 1000, "gid": 1000}}
    process = OciProcess.parse(json.dumps(document).encode())
    assert (process.args, process.env, process.cwd) == (["ls"], [], "/")
    assert process.document == document


def test_a_spec_without_hooks_leaves_start_to_the_agent() -> None:
    config = {"root": {"path": "/r"}, "process": {"args": ["x"]}, "hooks": {"prestart": []}}
    assert Container.from_config(config).poststart_hooks is False


@pytest.mark.parametrize(
    ("oci_json", "message"),
    [
        (b"{not json", "the container's OCI spec is not JSON"),
        (b"[]", "the container's OCI spec is not a JSON object"),
        (b'{"root": {"path": "rootfs"}}', "root.path must be absolute in the guest: 'rootfs'"),
        (b'{"root": {"path": "/r"}, "process": {"args": "ls"}}', "lists of strings"),
    ],
)
def test_a_bad_spec_is_an_invalid_argument_that_says_why(oci_json: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Container.parse(oci_json)


def test_a_bad_exec_process_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="the exec's OCI process is not a JSON object"):
        OciProcess.parse(b'"ls"')
