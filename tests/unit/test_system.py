"""harpoon.system without daemons: where things live, the files it renders, the
default network, the front door's nerdctl command line and the doctor's table."""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path

import pytest

from harpoon import dirs
from harpoon.buildkit.config import render_buildkitd_config
from harpoon.buildkit.daemon import BuildkitBinaries
from harpoon.devenv.tools import FLAVOURS
from harpoon.system import buildkitd, config, doctor, frontdoor, network
from harpoon.system.layout import BUILDKIT_NAMESPACE, NAMESPACE, RUNTIME, Layout

NERDCTL = Path("/opt/nerdctl")


@pytest.fixture
def rooted(monkeypatch: pytest.MonkeyPatch) -> Layout:
    for name in (dirs.RUN_DIR_ENV, dirs.GUEST_DIR_ENV, dirs.TEMPLATE_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(dirs.ROOT_ENV, "/srv/hp")
    return Layout.current()


def test_the_services_live_under_the_root(rooted: Layout) -> None:
    assert rooted.exclusive
    assert rooted.containerd_root == Path("/srv/hp/lib/containerd")
    assert rooted.containerd_socket == Path("/srv/hp/run/containerd/containerd.sock")
    assert rooted.pid_file("containerd") == Path("/srv/hp/run/services/containerd.pid")
    assert rooted.log_file("containerd") == Path("/srv/hp/lib/log/containerd.log")
    assert rooted.nerdctl_toml == Path("/srv/hp/lib/config/nerdctl.toml")


def test_without_a_root_the_run_directory_is_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dirs.ROOT_ENV, raising=False)
    monkeypatch.delenv(dirs.RUN_DIR_ENV, raising=False)
    layout = Layout.current()
    assert layout.run == Path("/run/harpoon") and not layout.exclusive


def test_a_run_directory_moved_out_of_the_root_is_not_the_roots_alone(
    rooted: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dirs.RUN_DIR_ENV, "/run/elsewhere")
    assert not Layout.current().exclusive


def test_containerd_config_puts_every_path_under_the_root_and_disables_cri(
    rooted: Layout,
) -> None:
    rendered = tomllib.loads(config.render_containerd_config(FLAVOURS["2.3"], rooted))
    assert rendered["version"] == 3
    assert rendered["root"] == "/srv/hp/lib/containerd"
    assert rendered["state"] == "/srv/hp/run/containerd"
    assert rendered["grpc"]["address"] == "/srv/hp/run/containerd/containerd.sock"
    assert rendered["ttrpc"]["address"] == "/srv/hp/run/containerd/containerd.sock.ttrpc"
    assert "io.containerd.grpc.v1.cri" in rendered["disabled_plugins"]
    opt = rendered["plugins"]["io.containerd.internal.v1.opt"]["path"]
    assert opt.startswith("/srv/hp/lib/")


def test_nerdctl_toml_names_every_global_setting(rooted: Layout) -> None:
    chosen = network.DefaultNetwork("hp-test", ipaddress.IPv4Network("10.213.7.0/24"))
    rendered = tomllib.loads(config.render_nerdctl_toml(rooted, Path("/usr/lib/cni"), chosen))
    assert rendered == {
        "address": "/srv/hp/run/containerd/containerd.sock",
        "namespace": NAMESPACE,
        "snapshotter": "overlayfs",
        "data_root": "/srv/hp/lib/nerdctl",
        "cni_path": "/usr/lib/cni",
        "cni_netconfpath": "/srv/hp/lib/cni/net.d",
        "cgroup_manager": "cgroupfs",
        "bridge_ip": "10.213.7.1/24",
    }


def test_the_default_network_is_nerdctls_bridge_on_harpoons_own_bridge_and_subnet(
    tmp_path: Path,
) -> None:
    chosen = network.DefaultNetwork("hp-test", ipaddress.IPv4Network("10.213.7.0/24"))
    network.conflist_path(tmp_path).write_text(network.render_conflist(chosen, tmp_path / "ipam"))
    conflist = json.loads((tmp_path / "nerdctl-bridge.conflist").read_text())
    assert conflist["name"] == "bridge"
    assert conflist["nerdctlLabels"] == {"nerdctl/default-network": "true"}
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "portmap", "firewall", "tuning"]
    bridge = conflist["plugins"][0]
    assert bridge["bridge"] == "hp-test"
    assert bridge["ipam"]["dataDir"] == str(tmp_path / "ipam")
    assert bridge["ipam"]["ranges"] == [[{"gateway": "10.213.7.1", "subnet": "10.213.7.0/24"}]]
    assert network.read(tmp_path) == chosen


def test_the_machines_harpoon_and_each_root_get_their_own_bridge_and_subnet() -> None:
    machine = network.choose(None, [])
    assert (machine.bridge, str(machine.subnet)) == ("harpoon0", "10.213.0.0/24")
    one, other = network.choose("/tmp/a", []), network.choose("/tmp/b", [])
    assert one.bridge != other.bridge and one.bridge != "nerdctl0"
    assert len(one.bridge) <= network.IFNAME_MAX_CHARS
    assert one.subnet != ipaddress.IPv4Network("10.4.0.0/24")
    assert network.choose("/tmp/a", []) == one  # the same root, the same network


def test_a_subnet_the_host_uses_is_skipped() -> None:
    first = network.choose("/tmp/a", [])
    taken = network.choose("/tmp/a", [first.subnet, ipaddress.IPv4Network("0.0.0.0/0")])
    assert taken.subnet != first.subnet and taken.bridge == first.bridge


def test_run_and_create_get_harpoons_runtime_first_so_that_the_users_wins() -> None:
    assert frontdoor.argv(NERDCTL, "run", ["--rm", "img", "echo", "--runtime"]) == [
        "/opt/nerdctl", "run", "--runtime", RUNTIME, "--rm", "img", "echo", "--runtime",
    ]  # fmt: skip
    user = ["--runtime", "io.containerd.runc.v2", "img"]
    assert frontdoor.argv(NERDCTL, "create", user)[2:] == ["--runtime", RUNTIME, *user]
    assert frontdoor.argv(NERDCTL, "container", ["run", "img"])[1:] == [
        "container", "run", "--runtime", RUNTIME, "img",
    ]  # fmt: skip
    assert frontdoor.argv(NERDCTL, "exec", ["c", "ls"]) == ["/opt/nerdctl", "exec", "c", "ls"]


def test_top_is_not_passed_to_nerdctl_and_build_is() -> None:
    assert "top" not in frontdoor.PASSTHROUGH and "build" in frontdoor.PASSTHROUGH
    assert frontdoor.argv(NERDCTL, "build", ["-t", "x", "."]) == [
        "/opt/nerdctl", "build", "-t", "x", ".",
    ]  # fmt: skip


def test_nerdctl_build_runs_the_pinned_buildctl_on_harpoons_buildkitd(rooted: Layout) -> None:
    binaries = BuildkitBinaries(Path("/opt/bk/buildkitd"), Path("/opt/bk/buildctl"))
    env = buildkitd.build_environment(
        rooted, binaries, {"PATH": "/usr/bin", "BUILDKIT_HOST": "tcp://elsewhere:1234"}
    )
    assert env == {
        "PATH": "/opt/bk:/usr/bin",
        "BUILDKIT_HOST": "unix:///srv/hp/run/buildkit/buildkitd.sock",
    }


def test_buildkitd_lives_under_the_root_in_a_namespace_of_its_own(rooted: Layout) -> None:
    assert rooted.buildkitd.root == Path("/srv/hp/lib/buildkit")
    assert rooted.buildkitd.socket == Path("/srv/hp/run/buildkit/buildkitd.sock")
    choice = config.ContainerdChoice(FLAVOURS["2.3"], "pinned")
    binaries = BuildkitBinaries(Path("/opt/bk/buildkitd"), Path("/opt/bk/buildctl"))
    service = buildkitd.service(rooted, choice, binaries)
    assert service.log == Path("/srv/hp/lib/log/buildkitd.log")
    assert service.on_demand
    rendered = tomllib.loads(render_buildkitd_config(service.settings(), rooted.buildkitd))
    worker = rendered["worker"]["containerd"]
    assert worker["namespace"] == BUILDKIT_NAMESPACE != NAMESPACE
    assert worker["address"] == "/srv/hp/run/containerd/containerd.sock"
    assert worker["networkMode"] == "host"
    assert worker["runtime"]["name"] == RUNTIME
    assert rendered["root"] == "/srv/hp/lib/buildkit"


def test_nerdctl_reads_harpoons_toml_and_no_variable_overrides_it(rooted: Layout) -> None:
    env = frontdoor.environment(
        rooted, {"CONTAINERD_ADDRESS": "/elsewhere", "NERDCTL_TOML": "/x", "HOME": "/root"}
    )
    assert env == {"NERDCTL_TOML": "/srv/hp/lib/config/nerdctl.toml", "HOME": "/root"}


def test_a_root_too_deep_for_its_sockets_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dirs.RUN_DIR_ENV, raising=False)
    monkeypatch.setenv(dirs.ROOT_ENV, "/tmp/" + "x" * 80)
    with pytest.raises(dirs.SocketPathTooLong):
        Layout.current().check_sockets()


# -- doctor -------------------------------------------------------------------------------


def test_every_piece_the_issue_names_is_checked() -> None:
    names = [check.name for check in doctor.CHECKS]
    assert names == [
        "VMM", "guest image", "VM templates", "shim", "containerd", "nerdctl",
        "CNI plugins", "iptables", "gvproxy", "virtiofsd", "buildkitd",
    ]  # fmt: skip


def test_a_missing_required_piece_is_named_with_its_fix_and_fails_the_doctor() -> None:
    present = doctor.Check("present", True, lambda: doctor.Finding(True, "/bin/x"), "-")
    absent = doctor.Check("absent", True, lambda: doctor.Finding(False, "no y"), "install y")
    results = doctor.examine((present, absent))
    assert [r.line for r in results] == [
        "ok       present: /bin/x",
        "MISSING  absent: no y; fix: install y",
    ]
    assert not doctor.healthy(results)


def test_a_missing_optional_piece_does_not_fail_the_doctor() -> None:
    optional = doctor.Check("extra", False, lambda: doctor.Finding(False, "none"), "get it")
    results = doctor.examine((optional,))
    assert results[0].line == "missing  extra: none; fix: get it"
    assert doctor.healthy(results)


def test_nerdctl_named_but_absent_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.NERDCTL_ENV, "/nonexistent/nerdctl")
    assert doctor.probe_nerdctl() == doctor.Finding(
        False, "no nerdctl ($HARPOON_NERDCTL, built or on PATH)"
    )


def test_cni_plugins_missing_from_the_named_directory_are_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("bridge", "loopback"):
        (tmp_path / name).touch(mode=0o755)
    monkeypatch.setenv(config.CNI_PATH_ENV, str(tmp_path))
    finding = doctor.probe_cni()
    assert not finding.ok
    assert finding.detail == f"no portmap, firewall, tuning, host-local in {tmp_path}"


def fake_containerd(monkeypatch: pytest.MonkeyPatch, directory: Path, version: str) -> Path:
    """A `containerd` that prints `version`, named by $HARPOON_CONTAINERD."""
    fake = directory / "containerd"
    fake.write_text(f"#!/bin/sh\necho {version}\n")
    fake.chmod(0o755)
    monkeypatch.setenv(config.CONTAINERD_ENV, str(fake))
    return fake


def test_containerd_older_than_nerdctl_needs_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = fake_containerd(monkeypatch, tmp_path, "containerd containerd.io 1.6.20~ds1 abc")
    found = config.find_containerd()
    assert found == f"{fake} is containerd 1.6.20~ds1: nerdctl needs 1.7 or later"


def test_a_containerd_on_path_brings_its_ctr_and_runc_shim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = fake_containerd(
        monkeypatch, tmp_path, "containerd github.com/containerd/containerd v1.7.27 x"
    )
    assert config.find_containerd() == f"{fake} has no ctr, containerd-shim-runc-v2 beside it"
    for name in ("ctr", "containerd-shim-runc-v2"):
        (tmp_path / name).touch(mode=0o755)
    found = config.find_containerd()
    assert isinstance(found, config.ContainerdChoice)
    assert (found.flavour.version, found.flavour.config_version) == ("1.7.27", 2)
    assert os.fspath(found.flavour.bin_dir) == str(tmp_path)
