"""The shim's command line and start-up protocol, as containerd 1.6 through 2.3 use them."""

from google.protobuf import any_pb2

from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from harpoon.api.containerd.runtimeoptions.v1 import api_pb2 as runtimeoptions
from harpoon.shim import paths
from harpoon.shim.bootstrap import parse_start_stdin, start_output
from harpoon.shim.cli import parse_flags


def test_parses_containerds_start_invocation() -> None:
    flags = parse_flags(
        [
            "-namespace",
            "default",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c1",
            "-debug",
            "start",
        ]
    )
    assert (flags.namespace, flags.id, flags.action, flags.debug) == (
        "default",
        "c1",
        "start",
        True,
    )
    assert flags.publish_binary == "/usr/bin/containerd"


def test_accepts_go_flag_spellings_and_ignores_unknown_flags() -> None:
    flags = parse_flags(["--namespace=ns", "-id=x", "-future-flag", "-bundle", "/b", "delete"])
    assert (flags.namespace, flags.id, flags.bundle, flags.action) == ("ns", "x", "/b", "delete")
    assert flags.ignored == ["-future-flag"]


def test_version_and_info_flags() -> None:
    assert parse_flags(["-v"]).version
    assert parse_flags(["-info"]).info
    assert not parse_flags(["-debug=false"]).debug


def test_socket_path_follows_containerds_convention() -> None:
    import hashlib

    path = paths.socket_path("/run/containerd/containerd.sock", "default", "c1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert str(path) == f"/run/containerd/s/{digest}"


def test_empty_stdin_means_no_options() -> None:
    parsed = parse_start_stdin(b"", "c1")
    assert parsed.params is None and parsed.options is None


def test_options_any_is_not_mistaken_for_bootstrap_params() -> None:
    options = runtimeoptions.Options(config_path="/etc/harpoon.toml")
    wire = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=options.SerializeToString())
    parsed = parse_start_stdin(wire.SerializeToString(), "c1")
    assert parsed.params is None
    assert parsed.options is not None and parsed.options.type_url == "runtimeoptions.v1.Options"


def test_bootstrap_params_of_containerd_2_3_are_recognised() -> None:
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"")
    params = bootstrap_pb2.BootstrapParams(
        instance_id="c1",
        namespace="default",
        containerd_version="v2.3.7",
        containerd_ttrpc_address="/run/containerd/containerd.sock.ttrpc",
        extensions=[bootstrap_pb2.Extension(value=options)],
    )
    parsed = parse_start_stdin(params.SerializeToString(), "c1")
    assert parsed.params is not None and parsed.params.containerd_version == "v2.3.7"
    assert parsed.options is not None and parsed.options.type_url == "runtimeoptions.v1.Options"
    # Only the two leading string fields, but field 1 is the task id: still params.
    minimal = bootstrap_pb2.BootstrapParams(instance_id="c1", namespace="default")
    assert parse_start_stdin(minimal.SerializeToString(), "c1").params is not None


def test_start_answers_2_3_with_a_bootstrap_result_and_others_with_the_address() -> None:
    address = "unix:///run/containerd/s/abc"
    assert start_output(address, None) == address.encode()
    params = bootstrap_pb2.BootstrapParams(instance_id="c1")
    result = bootstrap_pb2.BootstrapResult.FromString(start_output(address, params))
    assert (result.address, result.protocol, result.version) == (address, "ttrpc", 3)


def test_garbage_stdin_is_ignored_not_fatal() -> None:
    parsed = parse_start_stdin(b"\xff\xff\xff", "c1")
    assert parsed.params is None and parsed.options is None


def test_start_and_delete_do_not_load_openssl() -> None:
    """Both run in a fresh Python on every container's critical path: hashlib would
    load libcrypto (~2 ms) for the one digest they need."""
    import subprocess
    import sys

    script = (
        "import sys; from harpoon.shim import cleanup, start; "
        "print(sorted({'hashlib', '_hashlib'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
