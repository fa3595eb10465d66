"""The pure parts of the containerd harness: config rendering and output parsing."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from harpoon.devenv.containerd import (
    CRI_PLUGINS_V1,
    CRI_PLUGINS_V2,
    EROFS_SNAPSHOTTER,
    EROFS_WRITABLE_SIZE,
    Containerd,
    ContainerdError,
    ContainerdPaths,
    parse_server_version,
    render_config,
)
from harpoon.devenv.host import ShimProcess
from harpoon.devenv.tools import EROFS_UTILS, FLAVOURS, flavour

PATHS = ContainerdPaths.under(Path("/tmp/hp-abcdefgh"))


@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_config_puts_all_state_and_sockets_under_the_base_dir(name: str) -> None:
    config = tomllib.loads(render_config(flavour(name), PATHS))
    assert config["root"] == "/tmp/hp-abcdefgh/root"
    assert config["state"] == "/tmp/hp-abcdefgh/state"
    assert config["grpc"]["address"] == "/tmp/hp-abcdefgh/containerd.sock"
    assert config["ttrpc"]["address"] == "/tmp/hp-abcdefgh/containerd.sock.ttrpc"
    assert config["plugins"]["io.containerd.internal.v1.opt"]["path"] == "/tmp/hp-abcdefgh/opt"


def test_config_for_1_6_is_schema_2_without_cri() -> None:
    config = tomllib.loads(render_config(flavour("1.6"), PATHS))
    assert config["version"] == 2
    assert config["disabled_plugins"] == list(CRI_PLUGINS_V1)


def test_config_for_2_x_is_schema_3_without_any_cri_plugin() -> None:
    config = tomllib.loads(render_config(flavour("2.3"), PATHS))
    assert config["version"] == 3
    assert {
        "io.containerd.grpc.v1.cri",
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
    } <= set(config["disabled_plugins"])
    assert config["disabled_plugins"] == list(CRI_PLUGINS_V2)


def test_config_quotes_paths_with_special_characters() -> None:
    paths = ContainerdPaths.under(Path('/tmp/a "quoted" \\ dir'))
    config = tomllib.loads(render_config(flavour("2.3"), paths))
    assert config["root"] == '/tmp/a "quoted" \\ dir/root'


def test_socket_paths_longer_than_sun_path_are_refused() -> None:
    PATHS.check_socket_lengths()
    with pytest.raises(ContainerdError, match="bytes, the limit is 107"):
        ContainerdPaths.under(Path("/tmp/" + "x" * 90)).check_socket_lengths()


def test_server_version_is_read_from_the_server_section() -> None:
    out = (
        "Client:\n  Version:  2.3.7+unknown\n  Revision: \n  Go version: go1.26.8\n\n"
        "Server:\n  Version:  1.6.20~ds1\n  Revision: 1.6.20~ds1-1+deb12u3\n  UUID: x\n"
    )
    assert parse_server_version(out) == "1.6.20~ds1"
    with pytest.raises(ContainerdError, match="no Server section"):
        parse_server_version("Client:\n  Version: 1\n")


def test_shim_flags_are_read_in_both_go_flag_spellings() -> None:
    shim = ShimProcess(
        1, ("/usr/bin/containerd-shim-runc-v2", "-namespace", "default", "-address=/s")
    )
    assert shim.binary == "containerd-shim-runc-v2"
    assert shim.flag("namespace") == "default"
    assert shim.flag("address") == "/s"
    assert shim.flag("id") is None


def test_erofs_config_is_block_mode_with_the_erofs_differ_first() -> None:
    config = tomllib.loads(render_config(flavour("2.3"), PATHS, snapshotter=EROFS_SNAPSHOTTER))
    plugins = config["plugins"]
    assert plugins["io.containerd.snapshotter.v1.erofs"]["default_size"] == EROFS_WRITABLE_SIZE
    assert plugins["io.containerd.service.v1.diff-service"]["default"] == ["erofs", "walking"]
    assert (
        "io.containerd.snapshotter.v1.erofs"
        not in tomllib.loads(render_config(flavour("2.3"), PATHS))["plugins"]
    )


def test_erofs_config_is_refused_for_1_6_which_has_no_erofs_snapshotter() -> None:
    with pytest.raises(ValueError, match="no erofs snapshotter"):
        render_config(flavour("1.6"), PATHS, snapshotter=EROFS_SNAPSHOTTER)


def test_an_erofs_containerd_finds_the_built_mkfs_erofs_on_its_path() -> None:
    daemon = Containerd("2.3", snapshotter=EROFS_SNAPSHOTTER)
    entries = daemon._environment()["PATH"].split(os.pathsep)
    assert str(EROFS_UTILS.cache_dir) in entries
    assert daemon._environment()["CONTAINERD_SNAPSHOTTER"] == EROFS_SNAPSHOTTER
