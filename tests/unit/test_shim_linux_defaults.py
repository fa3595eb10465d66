"""harpoon.shim.transform.linux_defaults: config.json as nerdctl writes it on macOS (no
`linux` section, untyped binds) becomes a Linux spec the rest of the shim's planning
takes; a Linux spec is not touched."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from harpoon.errdefs import InvalidArgument
from harpoon.guest.cache import GuestImage
from harpoon.sandbox.binds import GUEST_MOUNTS, HostBind
from harpoon.shim import container_plan
from harpoon.shim.bundle import Bundle
from harpoon.shim.container_plan import encode, plan_container, plan_guest
from harpoon.shim.transform import PIPELINE
from harpoon.shim.transform.draft import Draft
from harpoon.shim.transform.linux_defaults import LinuxDefaults
from harpoon.vmm.backend import QemuBackend
from harpoon.vmm.devices import StreamBackend
from tests.unit.test_shim_transform import ctr_spec

#: containerd's Linux defaults, written out again from its source (pkg/oci/spec.go
#: populateDefaultUnixSpec) so that a change to the module's table shows here.
CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/scsi",
]  # fmt: skip
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
STATE = "/var/lib/nerdctl/1935db59/containers/default/4f3b2c1d"


def nerdctl_darwin_spec(host: Path, *, network: str = "none") -> dict[str, Any]:
    """config.json as nerdctl (HEAD, v2.3.4-217) writes it on macOS for
    `nerdctl run --rootfs --runtime io.containerd.harpoon.v1 --network NETWORK
    -v <host>/Users/me/src:/src:ro --name web <host>/Users/me/rootfs sh`, host paths
    moved under `host` (planning stats bind sources). `--rootfs`: with an image, nerdctl
    on darwin fails before it writes one (nerdctl #4571; and containerd's
    WithImageConfigArgs refuses a spec without a linux section).

    The shapes, from the source: populateDefaultDarwinSpec (ociVersion, root, cwd);
    WithRootFSPath, WithDefaultPathEnv, WithProcessArgs; ProcessFlagV's `-v` mount (type
    "" is omitted by Go's omitempty, options ro + rbind); WithEnv's HOSTNAME (empty: the
    hostname is chosen on Linux only); withNerdctlOCIHook's hooks; the nerdctl/* labels
    as annotations. `--network host` adds WithHostNamespace's empty linux section and
    the resolv.conf and hosts binds with darwin's empty propagation option; `none` adds
    nothing on darwin."""
    nerdctl = "/usr/local/bin/nerdctl"
    hook_env = ["PATH=/opt/homebrew/bin:/usr/bin:/bin:/usr/sbin:/sbin:/usr/sbin:/sbin"]
    spec: dict[str, Any] = {
        "ociVersion": "1.2.1",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOSTNAME="],
            "cwd": "/",
        },
        "root": {"path": str(host / "Users/me/rootfs")},
        "mounts": [
            {"destination": "/src", "source": str(host / "Users/me/src"),
             "options": ["ro", "rbind"]},
        ],
        "hooks": {
            "createRuntime": [{"path": nerdctl, "env": hook_env,
                               "args": [nerdctl, "internal", "oci-hook", "createRuntime"]}],
            "poststop": [{"path": nerdctl, "env": hook_env,
                          "args": [nerdctl, "internal", "oci-hook", "postStop"]}],
        },
        "annotations": {
            "nerdctl/namespace": "default",
            "nerdctl/name": "web",
            "nerdctl/hostname": "",
            "nerdctl/domainname": "",
            "nerdctl/extraHosts": "null",
            "nerdctl/state-dir": STATE,
            "nerdctl/networks": json.dumps([network]),
            "nerdctl/platform": "darwin/arm64",
            "nerdctl/log-uri": f"binary://{nerdctl}?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib"
                               "%2Fnerdctl%2F1935db59",
            "nerdctl/mounts": json.dumps([{"Type": "bind", "Source": str(host / "Users/me/src"),
                                           "Destination": "/src", "Mode": "ro"}]),
            "nerdctl/host-config": "{}",
            "nerdctl/dns": "{}",
        },
    }  # fmt: skip
    for path in (host / "Users/me/src", host / "Users/me/rootfs"):
        path.mkdir(parents=True, exist_ok=True)
    if network == "host":
        state = host / STATE.lstrip("/")
        state.mkdir(parents=True, exist_ok=True)
        (state / "resolv.conf").write_text("nameserver 192.168.64.1\n")
        hosts = host / "var/lib/nerdctl/1935db59/etchosts/default/4f3b2c1d/hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text("127.0.0.1 localhost\n")
        spec["linux"] = {}
        spec["mounts"] += [
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": str(state / "resolv.conf"), "options": ["bind", ""]},
            {"destination": "/etc/hosts", "type": "bind", "source": str(hosts),
             "options": ["bind", ""]},
        ]  # fmt: skip
    return spec


def guest_of(spec: dict[str, Any]) -> dict[str, Any]:
    guest: dict[str, Any] = plan_guest("default", "web", spec, "mac").guest_spec
    return guest


def destinations(guest: dict[str, Any]) -> list[str]:
    return [mount["destination"] for mount in guest["mounts"]]


# -- a Linux spec -----------------------------------------------------------------------


def test_a_linux_spec_is_left_byte_for_byte() -> None:
    spec = ctr_spec()
    draft = Draft("default", "c1", copy.deepcopy(spec), "h")
    LinuxDefaults().plan(draft)
    assert encode(draft.guest_spec) == encode(spec)


def test_the_whole_plan_of_a_linux_spec_is_what_it_was_without_the_transformer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_it = encode(plan_guest("default", "c1", ctr_spec(), "h").guest_spec)
    without = tuple(t for t in PIPELINE if not isinstance(t, LinuxDefaults))
    assert len(without) == len(PIPELINE) - 1
    monkeypatch.setattr(container_plan, "PIPELINE", without)
    assert encode(plan_guest("default", "c1", ctr_spec(), "h").guest_spec) == with_it


# -- nerdctl's darwin specs ---------------------------------------------------------------


def test_a_darwin_spec_gets_containerds_linux_defaults(tmp_path: Path) -> None:
    spec = nerdctl_darwin_spec(tmp_path)
    original = copy.deepcopy(spec)
    guest = guest_of(spec)
    assert spec == original, "containerd's spec is read, never changed"
    linux = guest["linux"]
    assert [ns["type"] for ns in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert linux["maskedPaths"] == MASKED
    assert linux["readonlyPaths"] == READONLY
    assert linux["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    process = guest["process"]
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["noNewPrivileges"] is True
    assert process["capabilities"] == {"bounding": CAPS, "permitted": CAPS, "effective": CAPS}
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert process["args"] == ["sh"] and process["cwd"] == "/"
    assert "TERM=xterm" not in process["env"]
    # The host's parts go as for any spec: hooks run on the host, uts gets a hostname.
    assert "hooks" not in guest
    assert guest["hostname"] == "mac"
    assert guest["annotations"] == spec["annotations"]


def test_a_darwin_specs_mounts_are_containerds_then_its_binds_typed(tmp_path: Path) -> None:
    guest = guest_of(nerdctl_darwin_spec(tmp_path))
    assert destinations(guest) == [
        "/proc", "/dev", "/sys", "/src", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup",
    ]  # fmt: skip
    by_destination = {mount["destination"]: mount for mount in guest["mounts"]}
    assert by_destination["/proc"] == {
        "destination": "/proc", "type": "proc", "source": "proc",
        "options": ["nosuid", "noexec", "nodev"],
    }  # fmt: skip
    assert by_destination["/sys/fs/cgroup"]["options"] == ["ro", "nosuid", "noexec", "nodev"]
    assert "/run" not in by_destination, "nerdctl keeps an image's /run (nerdctl #157)"
    # The untyped `-v` is a bind through the VM's share (harpoon.shim.transform.mounts).
    assert by_destination["/src"] == {
        "destination": "/src", "type": "bind", "source": f"{GUEST_MOUNTS}/0",
        "options": ["ro", "rbind"],
    }  # fmt: skip


def test_a_darwin_spec_plans_its_bind_read_only_and_recursive(tmp_path: Path) -> None:
    draft = plan_guest("default", "web", nerdctl_darwin_spec(tmp_path), "mac")
    assert draft.binds == [HostBind(0, tmp_path / "Users/me/src", True, True, True)]


def test_network_host_keeps_the_vms_network_and_binds_nerdctls_files(tmp_path: Path) -> None:
    guest = guest_of(nerdctl_darwin_spec(tmp_path, network="host"))
    assert [ns["type"] for ns in guest["linux"]["namespaces"]] == ["pid", "ipc", "uts", "mount"]
    by_destination = {mount["destination"]: mount for mount in guest["mounts"]}
    for index, name in ((1, "resolv.conf"), (2, "hosts")):
        assert by_destination[f"/etc/{name}"] == {
            "destination": f"/etc/{name}", "type": "bind",
            "source": f"{GUEST_MOUNTS}/{index}", "options": ["bind"],
        }  # fmt: skip


def test_a_terminal_gets_term_and_the_hostname_annotation_names_the_host(tmp_path: Path) -> None:
    spec = nerdctl_darwin_spec(tmp_path)
    spec["process"]["terminal"] = True
    spec["annotations"]["nerdctl/hostname"] = "web.local"
    guest = guest_of(spec)
    assert guest["process"]["env"][-1] == "TERM=xterm"
    assert guest["hostname"] == "web.local"
    spec["process"]["env"].append("TERM=vt100")
    assert guest_of(spec)["process"]["env"].count("TERM=xterm") == 0


def test_a_spec_mount_replaces_the_default_of_its_destination(tmp_path: Path) -> None:
    spec = nerdctl_darwin_spec(tmp_path)
    (tmp_path / "shm").mkdir()
    spec["mounts"].append({"destination": "/dev/shm", "source": str(tmp_path / "shm"),
                           "options": ["rbind"]})  # fmt: skip
    guest = guest_of(spec)
    shm = [mount for mount in guest["mounts"] if mount["destination"] == "/dev/shm"]
    assert shm == [{"destination": "/dev/shm", "type": "bind", "source": f"{GUEST_MOUNTS}/1",
                    "options": ["rbind"]}]  # fmt: skip
    # A /dev of its own takes every default under /dev with it (nerdctl's withMounts).
    spec["mounts"][-1]["destination"] = "/dev"
    assert [d for d in destinations(guest_of(spec)) if d.startswith("/dev")] == ["/dev"]


def test_an_empty_root_path_is_containerds_rootfs(tmp_path: Path) -> None:
    spec = nerdctl_darwin_spec(tmp_path)
    spec["root"] = {"path": ""}  # populateDefaultDarwinSpec's Root{}: a snapshot's rootfs
    draft = Draft("default", "web", spec, "mac")
    LinuxDefaults().plan(draft)
    assert draft.guest_spec["root"] == {"path": "rootfs"}


@pytest.mark.parametrize(
    "options", [None, [], ["ro"], ["nosuid", "nodev"], ["", "ro"]], ids=repr
)  # fmt: skip
def test_an_untyped_mount_that_is_not_a_bind_is_refused_by_name(
    tmp_path: Path, options: list[str] | None
) -> None:
    spec = nerdctl_darwin_spec(tmp_path)
    mount: dict[str, Any] = {"destination": "/data", "source": "/Users/me/data"}
    if options is not None:
        mount["options"] = options
    spec["mounts"].append(mount)
    with pytest.raises(InvalidArgument) as raised:
        guest_of(spec)
    message = str(raised.value)
    assert "'/Users/me/data' at '/data'" in message
    assert "must be a bind" in message


def test_an_untyped_bind_in_a_linux_spec_is_left_to_the_mounts_step(tmp_path: Path) -> None:
    """Only a spec made elsewhere is typed here: a Linux spec's untyped mount gets the
    mounts step's own verdict, as before."""
    spec = ctr_spec()
    spec["mounts"].append({"destination": "/data", "source": str(tmp_path),
                           "options": ["rbind"]})  # fmt: skip
    guest = guest_of(spec)
    assert guest["mounts"][-1]["type"] == "bind"  # the mounts step types what it binds
    assert guest["linux"]["maskedPaths"] == ["/proc/kcore"]


# -- the whole plan -------------------------------------------------------------------------


def test_the_shim_plans_a_vm_for_a_darwin_spec(tmp_path: Path) -> None:
    """The shim's whole planning (what its daemon runs at start) takes the spec: a VM
    with the rootfs share, gvproxy's user-mode NIC (no network namespace on the host),
    no netns; the guest spec is crun's."""
    spec = nerdctl_darwin_spec(tmp_path)
    (tmp_path / "kernel").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    image = GuestImage("arm64", tmp_path / "kernel", tmp_path / "initrd", "6.1.0-test", "d")
    bundle = Bundle(tmp_path / "bundle", spec)
    plan = plan_container("default", "web", bundle, image, QemuBackend(), templates=False)
    config = plan.launch.config
    assert config.netns is None
    assert [type(nic.backend) for nic in config.nics] == [StreamBackend]
    assert [share.tag for share in config.shares] == ["rootfs"]
    guest = json.loads(plan.guest_spec)
    assert guest["ociVersion"] == "1.0.2"
    assert guest["linux"]["cgroupsPath"] == "/container"
    assert guest["linux"]["personality"] == {"domain": "LINUX"}
    assert plan.binds == (HostBind(0, tmp_path / "Users/me/src", True, True, True),)
