"""harpoon.shim.transform: what of containerd's config.json reaches crun in the guest,
and the devices the plan gives the container's VM."""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harpoon import linux
from harpoon.api.names import CONTAINER_CGROUPS_PATH
from harpoon.errdefs import FailedPrecondition, InvalidArgument, Unimplemented
from harpoon.net.wire import TAP_NAME
from harpoon.sandbox.binds import GUEST_MOUNTS, HostBind
from harpoon.sandbox.rootfs import GUEST_ROOTFS, SHARE_TAG
from harpoon.shim import paths
from harpoon.shim.container_plan import encode, plan_guest
from harpoon.shim.transform.host_policy import process_for_guest
from harpoon.shim.transform.network import user_network_ports
from harpoon.vmm.devices import StreamBackend, TapBackend

GUEST_ROOT = GUEST_ROOTFS


def spec_for_guest(spec: dict[str, Any], *, host_hostname: str) -> dict[str, Any]:
    guest: dict[str, Any] = plan_guest("default", "c1", spec, host_hostname).guest_spec
    return guest


def ctr_spec() -> dict[str, Any]:
    """The shape of the spec `ctr run` writes (containerd's defaults), trimmed."""
    return {
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]},
            "apparmorProfile": "cri-containerd.apparmor.d",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hooks": {"createRuntime": [{"path": "/usr/local/bin/nerdctl", "args": ["oci-hook"]}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs"},
        ],
        "linux": {
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": 67108864},
                "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
                "blockIO": {"weight": 100, "throttleReadBpsDevice": [{"major": 8, "minor": 0}]},
            },
            "cgroupsPath": "/default/box",
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1234"},
            ],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "mountLabel": "system_u:object_r:container_file_t:s0",
        },
    }


def test_root_path_becomes_the_guest_share_and_keeps_readonly() -> None:
    guest = spec_for_guest(ctr_spec(), host_hostname="h")
    assert guest["root"] == {"path": GUEST_ROOT, "readonly": True}


def test_an_erofs_rootfs_adds_its_disks_and_the_guest_overlay_is_the_root() -> None:
    from harpoon.api.containerd.types import mount_pb2
    from harpoon.shim.transform import guest_rootfs

    snapshot = "/c/root/io.containerd.snapshotter.v1.erofs/snapshots"
    mounts = (
        mount_pb2.Mount(type="ext4", source=f"{snapshot}/2/rwlayer.img", options=["rw", "loop"]),
        mount_pb2.Mount(type="erofs", source=f"{snapshot}/1/layer.erofs", options=["ro", "loop"]),
        mount_pb2.Mount(
            type="format/mkdir/overlay",
            source="overlay",
            options=["upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work",
                     "lowerdir={{ mount 1 }}"],
        ),
    )  # fmt: skip
    draft = plan_guest("ns", "c1", ctr_spec(), "h", rootfs_mounts=mounts)
    assert [(d.id, d.read_only) for d in draft.disks] == [("rootfs0", False), ("rootfs1", True)]
    assert draft.guest_spec["root"] == {"path": guest_rootfs.GUEST_ROOT, "readonly": True}
    assert draft.guest_rootfs is not None and draft.rootfs_share is not None  # binds need it
    # Without them (overlayfs: mounted on the host at Create) the VM has no disk.
    assert plan_guest("ns", "c1", ctr_spec(), "h").disks == []


def test_host_only_parts_are_dropped_and_the_rest_kept() -> None:
    spec = ctr_spec()
    original = copy.deepcopy(spec)
    guest = spec_for_guest(spec, host_hostname="h")
    assert spec == original, "the input spec must not be changed"
    assert "hooks" not in guest
    assert "apparmorProfile" not in guest["process"]
    assert "mountLabel" not in guest["linux"]
    resources = guest["linux"]["resources"]
    assert "hugepageLimits" not in resources
    assert resources["blockIO"] == {"weight": 100}
    assert resources["memory"] == {"limit": 67108864}
    assert resources["devices"] == [{"allow": False, "access": "rwm"}]
    # Namespaces by path are host files: new ones of the same type instead.
    assert guest["linux"]["namespaces"] == [
        {"type": t} for t in ("pid", "ipc", "uts", "mount", "network")
    ]
    # What crun implements stays exactly as containerd wrote it.
    for key in ("maskedPaths", "readonlyPaths"):
        assert guest["linux"][key] == original["linux"][key]
    assert guest["mounts"] == original["mounts"]
    assert guest["process"]["capabilities"] == original["process"]["capabilities"]
    assert guest["process"]["noNewPrivileges"] is True


def test_hostname_defaults_to_the_hosts_only_with_a_uts_namespace() -> None:
    guest = spec_for_guest(ctr_spec(), host_hostname="builder")
    assert guest["hostname"] == "builder"
    named = ctr_spec() | {"hostname": "box"}
    assert spec_for_guest(named, host_hostname="h")["hostname"] == "box"
    shared = ctr_spec()
    shared["linux"]["namespaces"] = [{"type": "pid"}, {"type": "mount"}]
    assert "hostname" not in spec_for_guest(shared, host_hostname="h")


def test_bind_mounts_become_binds_of_the_shares_mount_points_in_spec_order(
    tmp_path: Path,
) -> None:
    """nerdctl's `-v` (type none, rbind), its /etc files (type bind), ctr's --mount: each
    keeps its destination and options, its source becomes the share's mount point."""
    directory, single = tmp_path / "app", tmp_path / "hosts"
    directory.mkdir()
    single.write_text("127.0.0.1 localhost\n")
    mounts = [
        {"destination": "/app", "type": "none", "source": str(directory),
         "options": ["rbind", "ro", "rprivate"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(single),
         "options": ["bind", "rprivate"]},
        {"destination": "/app/sub", "type": "bind", "source": str(directory)},
    ]  # fmt: skip
    spec = ctr_spec()
    spec["mounts"] += mounts
    draft = plan_guest("ns", "c1", spec, "h")
    guest_mounts = draft.guest_spec["mounts"][-3:]
    assert [m["destination"] for m in guest_mounts] == ["/app", "/etc/hosts", "/app/sub"]
    assert [m["source"] for m in guest_mounts] == [f"{GUEST_MOUNTS}/{n}" for n in range(3)]
    assert {m["type"] for m in guest_mounts} == {"bind"}
    assert guest_mounts[0]["options"] == ["rbind", "ro", "rprivate"]
    assert draft.binds == [
        HostBind(0, directory, directory=True, readonly=True, recursive=True),
        HostBind(1, single, directory=False, readonly=False, recursive=False),
        HostBind(2, directory, directory=True, readonly=False, recursive=False),
    ]
    assert spec["mounts"][-3:] == mounts  # config.json as containerd wrote it


def test_a_relative_bind_source_is_relative_to_the_bundle(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    spec = ctr_spec()
    spec["mounts"].append({"destination": "/d", "type": "bind", "source": "data"})
    draft = plan_guest("ns", "c1", spec, "h", bundle_dir=tmp_path)
    assert draft.binds[0].source == tmp_path / "data"


def test_a_device_bound_from_the_host_is_the_guests_device_of_that_path() -> None:
    spec = ctr_spec()
    spec["mounts"].append({"destination": "/x", "type": "bind", "source": "/dev/null"})
    draft = plan_guest("ns", "c1", spec, "h")
    assert draft.binds == []
    assert draft.guest_spec["mounts"][-1]["source"] == "/dev/null"


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        yield path


def test_a_socket_mount_is_refused_unless_the_workload_can_do_without_it(
    unix_socket: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ctr_spec()
    mount = {"destination": "/run/x.sock", "type": "bind", "source": str(unix_socket)}
    spec["mounts"].append(mount)
    with pytest.raises(Unimplemented, match="a unix socket cannot cross into the VM") as refused:
        plan_guest("ns", "c1", spec, "h")
    assert "/run/x.sock" in str(refused.value)
    spec["mounts"][-1]["destination"] = "/dev/otel-grpc.sock"  # BuildKit's
    draft = plan_guest("ns", "c1", spec, "h")
    assert "/dev/otel-grpc.sock" not in [m["destination"] for m in draft.guest_spec["mounts"]]
    assert draft.binds == []
    assert "leaving out the mount" in caplog.text


@pytest.mark.parametrize(
    ("mount", "error", "words"),
    [
        ({"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]},
         FailedPrecondition, "the source does not exist"),
        ({"destination": "/etc/hosts", "type": "none", "source": "/no/hosts", "options": ["bind"]},
         FailedPrecondition, "the source does not exist"),
        ({"destination": "/nfs", "type": "nfs", "source": "server:/export"},
         Unimplemented, "harpoon cannot serve the mount"),
        ({"destination": "/b", "type": "bind"}, InvalidArgument, "needs a source path"),
    ],
)  # fmt: skip
def test_a_mount_harpoon_cannot_serve_fails_clearly_naming_it(
    mount: dict[str, Any], error: type[Exception], words: str
) -> None:
    spec = ctr_spec()
    spec["mounts"].append(mount)
    with pytest.raises(error, match=words) as raised:
        spec_for_guest(spec, host_hostname="h")
    assert mount["destination"] in str(raised.value)


def test_exec_process_loses_host_policy_only() -> None:
    process = {"args": ["ls"], "selinuxLabel": "x", "apparmorProfile": "y", "terminal": True}
    assert process_for_guest(process) == {"args": ["ls"], "terminal": True}
    assert json.loads(encode(process_for_guest(process))) == {"args": ["ls"], "terminal": True}


def test_a_minimal_spec_without_linux_section_gets_containerds_linux_defaults() -> None:
    """A spec with no `linux` is one written for another host (nerdctl on macOS):
    harpoon.shim.transform.linux_defaults fills in containerd's Linux defaults."""
    spec = {"process": {"args": ["true"]}, "root": {"path": "rootfs"}}
    guest = spec_for_guest(spec, host_hostname="h")
    assert guest["root"] == {"path": GUEST_ROOT}
    assert guest["process"]["args"] == ["true"]
    assert guest["process"]["user"] == {"uid": 0, "gid": 0}
    assert [ns["type"] for ns in guest["linux"]["namespaces"]] == [
        "pid", "ipc", "uts", "mount", "network",
    ]  # fmt: skip
    assert guest["linux"]["cgroupsPath"] == "/container"
    assert guest["linux"]["personality"] == {"domain": "LINUX"}
    assert [m["destination"] for m in guest["mounts"]][:3] == ["/proc", "/dev", "/sys"]


def test_the_guest_spec_is_labelled_for_the_guests_crun_in_the_agents_cgroup() -> None:
    """crun 1.8 takes ociVersion 1.0.x only; the container's cgroup is the one the agent
    reads stats from; the container gets Linux's default personality (so its processes
    keep ASLR, crun itself runs without), unless the spec names its own."""
    guest = spec_for_guest(ctr_spec(), host_hostname="h")
    assert guest["ociVersion"] == "1.0.2"
    assert guest["linux"]["cgroupsPath"] == CONTAINER_CGROUPS_PATH
    assert guest["linux"]["personality"] == {"domain": "LINUX"}
    for given, expected in (
        (None, {"domain": "LINUX"}),
        ({"domain": "LINUX32"}, {"domain": "LINUX32"}),
    ):
        spec = ctr_spec()
        spec["linux"]["personality"] = given
        assert spec_for_guest(spec, host_hostname="h")["linux"]["personality"] == expected


def test_the_plan_gives_the_vm_its_rootfs_share_and_size() -> None:
    draft = plan_guest("ns", "c1", ctr_spec(), "h")
    assert [share.tag for share in draft.shares] == [SHARE_TAG]
    assert draft.shares[0].host_path == draft.rootfs_share == paths.share_dir("ns", "c1")
    assert draft.disks == []
    # 64 MiB limit + 128 MiB overhead, on the ladder's first step.
    assert draft.memory_mib == 256


def test_a_refused_spec_is_refused_by_the_plan_before_any_device_is_made() -> None:
    spec = ctr_spec()
    spec["mounts"].append({"destination": "/data", "type": "nfs", "source": "srv:/x"})
    with pytest.raises(Unimplemented):
        plan_guest("ns", "c1", spec, "h")


def test_a_new_network_namespace_is_harpoons_own_with_a_tap_nic() -> None:
    spec = ctr_spec()
    spec["linux"]["namespaces"] = [{"type": "pid"}, {"type": "network"}]
    draft = plan_guest("ns", "c1", spec, "h")
    assert draft.netns == paths.netns_path("ns", "c1") and draft.netns_owned
    (nic,) = draft.nics
    assert isinstance(nic.backend, TapBackend) and nic.backend.ifname == TAP_NAME
    # The guest keeps its own network namespace, which gets the NIC once configured.
    guest_types = [ns["type"] for ns in draft.guest_spec["linux"]["namespaces"]]
    assert "network" in guest_types


def test_on_a_host_without_network_namespaces_a_new_one_is_made_in_the_guest_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Mac (no netns, no tap): `ctr run` without --net-host gets a namespace of its own
    in the guest, on the user-mode network, publishing nothing; a namespace named by
    path is still refused there by the VMM (nothing harpoon can join)."""
    monkeypatch.setattr(linux, "HAS_NETWORK_NAMESPACES", False)
    spec = ctr_spec()
    spec["linux"]["namespaces"] = [{"type": "pid"}, {"type": "network"}]
    draft = plan_guest("ns", "c1", spec, "h")
    assert draft.netns is None and not draft.netns_owned
    (nic,) = draft.nics
    assert isinstance(nic.backend, StreamBackend) and nic.backend.gvproxy
    assert user_network_ports(spec) == ()
    guest_types = [ns["type"] for ns in draft.guest_spec["linux"]["namespaces"]]
    assert "network" in guest_types
    spec["linux"]["namespaces"] = [{"type": "pid"}]
    assert user_network_ports(spec) is None  # the host's network: the guest's own


def test_a_network_namespace_named_by_path_is_used_and_not_owned() -> None:
    spec = ctr_spec()
    spec["linux"]["namespaces"] = [{"type": "network", "path": "/var/run/netns/cni-1"}]
    draft = plan_guest("ns", "c1", spec, "h")
    assert (draft.netns, draft.netns_owned) == (Path("/var/run/netns/cni-1"), False)
    spec["linux"]["namespaces"] = [{"type": "network", "path": "netns/cni-1"}]
    with pytest.raises(InvalidArgument, match="not absolute"):
        plan_guest("ns", "c1", spec, "h")


def test_the_hosts_network_is_a_gvproxy_nic_in_the_vms_state_directory() -> None:
    spec = ctr_spec()
    spec["linux"]["namespaces"] = [{"type": "pid"}, {"type": "mount"}]
    draft = plan_guest("ns", "c1", spec, "h")
    assert draft.netns is None
    (nic,) = draft.nics
    assert isinstance(nic.backend, StreamBackend) and nic.backend.gvproxy
    assert nic.backend.socket.parent == paths.vm_state_dir("ns", "c1")


@pytest.mark.parametrize("phase", ["createContainer", "startContainer"])
def test_hooks_that_would_run_in_the_guest_are_planned_past_and_checked(phase: str) -> None:
    # Not run (they run in the container's namespaces: the guest's), but checked.
    spec = ctr_spec()
    spec["hooks"] = {phase: [{"path": "/usr/bin/true"}]}
    assert plan_guest("ns", "c1", spec, "h").guest_spec.get("hooks") is None
    spec["hooks"] = {phase: [{"path": "true"}]}
    with pytest.raises(InvalidArgument, match=phase):
        plan_guest("ns", "c1", spec, "h")


def test_an_invalid_host_hook_is_refused_before_any_vm() -> None:
    spec = ctr_spec()
    spec["hooks"] = {"createRuntime": [{"path": "relative/hook"}]}
    with pytest.raises(InvalidArgument, match="createRuntime"):
        plan_guest("ns", "c1", spec, "h")
    spec["hooks"] = {"createRuntime": [{"path": "/usr/bin/true"}], "poststop": []}
    assert plan_guest("ns", "c1", spec, "h").guest_spec.get("hooks") is None
