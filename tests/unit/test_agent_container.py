"""The container's OCI documents parsed once (harpoon.agent.container)."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_an_executable_bound_into_the_container_is_left_to_exec_to_find(
    tmp_path: Path,
) -> None:
    """A bind mount is there only once crun has mounted it: the agent's runc-worded
    check must not refuse an init whose executable the spec binds in."""
    from harpoon.agent.processes import find_executable

    container = Container.from_config(
        {
            "root": {"path": str(tmp_path)},
            "process": {"args": ["/bin/forever"], "cwd": "/"},
            "mounts": [
                {"destination": "/bin/forever", "type": "bind", "source": "/x/0"},
                {"destination": "/opt", "type": "none", "source": "/x/1", "options": ["rbind"]},
                {"destination": "/proc", "type": "proc", "source": "proc"},
            ],
        }
    )
    assert container.bind_destinations() == ("/bin/forever", "/opt")
    mounted = container.bind_destinations()
    assert find_executable("/bin/forever", [], "/", str(tmp_path), mounted) == "/bin/forever"
    found = find_executable("tool", ["PATH=/opt/bin"], "/", str(tmp_path), mounted)
    assert found == "/opt/bin/tool"
    assert find_executable("/bin/other", [], "/", str(tmp_path), mounted) is None
    assert find_executable("/proc/x", [], "/", str(tmp_path), mounted) is None
