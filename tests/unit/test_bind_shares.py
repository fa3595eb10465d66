"""Host binds as shares of their own (harpoon.sandbox.bind_shares): which way a host
takes, the shares and guest paths a spec's binds are planned as, the guest's mounts of
them, and the template a VM with them does not have."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from harpoon import linux
from harpoon.errdefs import FailedPrecondition
from harpoon.guest.cache import GuestImage
from harpoon.sandbox import bind_shares, rootfs
from harpoon.sandbox.bind_shares import GUEST_BINDS, BindShare
from harpoon.sandbox.binds import HostBind
from harpoon.sandbox.rootfs import NINEP_OPTIONS, SHARE_TAG
from harpoon.sandbox.template import TemplateStore
from harpoon.shim.bundle import Bundle
from harpoon.shim.container_plan import ContainerPlan, plan_container, plan_guest
from harpoon.shim.transform.mounts import readonly
from harpoon.vmm.backend import Backend
from harpoon.vmm.base import VirtualMachine, VMConfig, VMError
from harpoon.vmm.devices import Share, check_id
from tests.unit.test_shim_linux_defaults import nerdctl_darwin_spec


@pytest.fixture(autouse=True)
def shares_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bind_shares.ENV, "1")


def bind(source: Path | str, destination: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": list(options)}  # fmt: skip


def spec_with(*mounts: dict[str, Any]) -> dict[str, Any]:
    return {
        "process": {"args": ["sh"]},
        "linux": {"namespaces": [{"type": "mount"}]},  # a Linux spec: left as it is
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}, *mounts],
    }


def guest_sources(draft_spec: dict[str, Any]) -> list[str]:
    return [m["source"] for m in draft_spec["mounts"] if m["type"] == "bind"]


# -- which way -------------------------------------------------------------------------


def test_host_mounts_are_linuxs_default_and_shares_are_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linux, "HAS_BIND_MOUNTS", True)
    monkeypatch.delenv(bind_shares.ENV)
    assert not bind_shares.enabled()
    monkeypatch.setenv(bind_shares.ENV, "0")
    assert not bind_shares.enabled()
    monkeypatch.setenv(bind_shares.ENV, "1")
    assert bind_shares.enabled()


def test_a_host_without_bind_mounts_always_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux, "HAS_BIND_MOUNTS", False)
    monkeypatch.delenv(bind_shares.ENV)
    assert bind_shares.enabled()
    monkeypatch.setenv(bind_shares.ENV, "0")
    with pytest.raises(ValueError, match=r"HARPOON_BIND_SHARES=0: this host .* cannot bind mount"):
        bind_shares.enabled()


def test_a_bad_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bind_shares.ENV, "yes")
    with pytest.raises(ValueError, match="HARPOON_BIND_SHARES='yes'"):
        bind_shares.enabled()


def test_host_mode_plans_no_share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(bind_shares.ENV, "0")
    typed = {"destination": "/t", "type": "rbind", "source": str(tmp_path)}
    draft = plan_guest("ns", "c1", spec_with(bind(tmp_path, "/data", "bind", "ro"), typed), "h")
    assert draft.bind_shares == []
    assert draft.binds == [
        HostBind(0, tmp_path, directory=True, readonly=True, recursive=False),
        HostBind(1, tmp_path, directory=True, readonly=False, recursive=True),  # its type
    ]
    assert [share.tag for share in draft.shares] == [SHARE_TAG]


# -- planning --------------------------------------------------------------------------


def test_a_directory_is_a_share_of_its_own_bound_whole(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    spec = spec_with(bind(data, "/data", "rbind", "rw", "rprivate"))
    draft = plan_guest("ns", "c1", spec, "h")
    assert draft.bind_shares == [BindShare("bind0", data, readonly=False)]
    assert draft.binds == []  # nothing for the host to mount
    mount = draft.guest_spec["mounts"][-1]
    assert mount == {"destination": "/data", "type": "bind", "source": f"{GUEST_BINDS}/bind0",
                     "options": ["rbind", "rw", "rprivate"]}  # fmt: skip
    # The VM's device: the directory, writable on the host side (vfkit has no other).
    assert draft.shares[-1] == Share("bind0", data, fs="9p", read_only=False)
    assert [share.tag for share in draft.shares] == [SHARE_TAG, "bind0"]
    assert spec["mounts"][-1]["source"] == str(data)  # config.json is left as it was


def test_a_file_is_bound_out_of_its_directorys_share(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    draft = plan_guest("ns", "c1", spec_with(bind(hosts, "/etc/hosts", "bind", "ro")), "h")
    assert draft.bind_shares == [BindShare("bind0", tmp_path, readonly=True)]
    assert guest_sources(draft.guest_spec) == [f"{GUEST_BINDS}/bind0/hosts"]


def test_files_of_one_directory_share_one_device_unless_their_read_only_flags_differ(
    tmp_path: Path,
) -> None:
    """nerdctl's /etc/hosts, /etc/resolv.conf and /etc/hostname: one directory."""
    for name in ("hosts", "resolv.conf", "hostname", "secret"):
        (tmp_path / name).write_text(name)
    spec = spec_with(
        bind(tmp_path / "hosts", "/etc/hosts", "bind"),
        bind(tmp_path / "resolv.conf", "/etc/resolv.conf", "bind"),
        bind(tmp_path / "hostname", "/etc/hostname", "bind", "ro"),
        bind(tmp_path, "/all", "rbind"),  # the same directory, read-write: the same share
    )
    draft = plan_guest("ns", "c1", spec, "h")
    assert draft.bind_shares == [
        BindShare("bind0", tmp_path, readonly=False),
        BindShare("bind1", tmp_path, readonly=True),
    ]
    assert guest_sources(draft.guest_spec) == [
        f"{GUEST_BINDS}/bind0/hosts",
        f"{GUEST_BINDS}/bind0/resolv.conf",
        f"{GUEST_BINDS}/bind1/hostname",
        f"{GUEST_BINDS}/bind0",
    ]
    assert [share.tag for share in draft.shares] == [SHARE_TAG, "bind0", "bind1"]


def test_read_only_is_the_last_of_ro_and_rw_as_crun_reads_them() -> None:
    assert readonly(["rbind", "ro"])
    assert not readonly(["rbind"])
    assert not readonly(["ro", "rw"])
    assert readonly(["rw", "nosuid", "ro"])


def test_every_bind_gets_a_tag_a_vmm_takes(tmp_path: Path) -> None:
    mounts = []
    for n in range(12):
        (tmp_path / f"d{n}").mkdir()
        mounts.append(bind(tmp_path / f"d{n}", f"/d{n}", "rbind"))
    draft = plan_guest("ns", "c1", spec_with(*mounts), "h")
    tags = [share.tag for share in draft.bind_shares]
    assert tags == [f"bind{n}" for n in range(12)]
    for tag in tags:
        check_id("share", tag)
        assert bind_shares.is_bind_share(Share(tag, tmp_path))
    assert not bind_shares.is_bind_share(Share(SHARE_TAG, tmp_path))


def test_a_source_reached_through_a_symlink_shares_the_real_directory(tmp_path: Path) -> None:
    """The guest would follow a shared link into its own tree: the plan resolves it."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "conf").write_text("x")
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "conf-link").symlink_to(real / "conf")
    spec = spec_with(bind(tmp_path / "link", "/a", "rbind"), bind(tmp_path / "conf-link", "/b"))
    draft = plan_guest("ns", "c1", spec, "h")
    assert draft.bind_shares == [BindShare("bind0", real, readonly=False)]
    assert guest_sources(draft.guest_spec) == [f"{GUEST_BINDS}/bind0", f"{GUEST_BINDS}/bind0/conf"]


def test_a_missing_source_is_refused_naming_the_mount(tmp_path: Path) -> None:
    spec = spec_with(bind(tmp_path / "gone", "/data", "rbind"))
    with pytest.raises(FailedPrecondition) as refused:
        plan_guest("ns", "c1", spec, "h")
    assert (
        f"mount of '{tmp_path / 'gone'}' at '/data' (type 'bind'): the source does not exist"
        in str(refused.value)
    )


def test_a_device_node_stays_the_guests_own(tmp_path: Path) -> None:
    draft = plan_guest("ns", "c1", spec_with(bind("/dev/null", "/x")), "h")
    assert draft.bind_shares == [] and guest_sources(draft.guest_spec) == ["/dev/null"]


# -- the container's plan: its VM and its template -------------------------------------


class FakeBackend(Backend):
    name = "fake"

    def new_vm(self, config: VMConfig) -> VirtualMachine:
        raise NotImplementedError

    def template_identity(self, config: VMConfig) -> dict[str, Any] | None:
        return {"layout": config.layout()}

    def launch_early(self, config: VMConfig, restoring: Path | None) -> None:
        raise NotImplementedError

    async def discard_early(self) -> None:
        pass


def container_plan(tmp_path: Path, spec: dict[str, Any], templates: Any) -> ContainerPlan:
    image = GuestImage("amd64", tmp_path / "kernel", tmp_path / "initrd", "6.1.0-test", "d")
    bundle = Bundle(tmp_path / "bundle", spec)
    return plan_container("default", "c1", bundle, image, FakeBackend(), templates)


def test_a_vm_with_bind_shares_neither_restores_nor_builds_a_template(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    store = TemplateStore(tmp_path / "templates")
    plan = container_plan(tmp_path, spec_with(bind(tmp_path / "data", "/data", "rbind")), store)
    assert plan.bind_shares == (BindShare("bind0", tmp_path / "data", readonly=False),)
    assert [share.tag for share in plan.launch.config.shares] == [SHARE_TAG, "bind0"]
    # No store: nothing looked up, and no template built once the container runs.
    assert plan.launch.store is None and plan.launch.template is None
    assert not (tmp_path / "templates").exists()


def test_a_container_without_binds_keeps_its_template_in_the_shares_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TemplateStore(tmp_path / "templates")
    shares = container_plan(tmp_path, spec_with(), store).launch
    assert shares.store is store
    monkeypatch.setenv(bind_shares.ENV, "0")
    assert container_plan(tmp_path, spec_with(), store).launch.config == shares.config


def test_a_darwin_spec_on_a_host_without_bind_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nerdctl's `-v` on macOS (type "", rbind): a share of its own, no host bind."""
    monkeypatch.setattr(linux, "HAS_BIND_MOUNTS", False)
    monkeypatch.delenv(bind_shares.ENV)
    plan = container_plan(tmp_path, nerdctl_darwin_spec(tmp_path), False)
    source = tmp_path / "Users/me/src"
    assert plan.binds == ()
    assert plan.bind_shares == (BindShare("bind0", source, readonly=True),)
    guest = json.loads(plan.guest_spec)
    [mount] = [m for m in guest["mounts"] if m["destination"] == "/src"]
    assert (mount["type"], mount["source"]) == ("bind", f"{GUEST_BINDS}/bind0")


# -- the guest's mounts ----------------------------------------------------------------


class RecordingAgent:
    def __init__(self) -> None:
        self.mounts: list[tuple[str, str, str, list[str]]] = []

    async def mount(self, source: str, target: str, fstype: str, options: list[str]) -> None:
        self.mounts.append((source, target, fstype, options))


def test_the_guest_mounts_each_share_read_only_when_its_binds_are(tmp_path: Path) -> None:
    shares = (BindShare("bind0", tmp_path, readonly=False), BindShare("bind1", tmp_path, True))
    served = (Share(SHARE_TAG, tmp_path), Share("bind0", tmp_path), Share("bind1", tmp_path))
    agent = RecordingAgent()
    asyncio.run(bind_shares.mount(agent, shares, served))  # type: ignore[arg-type]
    assert agent.mounts == [
        ("bind0", f"{GUEST_BINDS}/bind0", "9p", NINEP_OPTIONS),
        ("bind1", f"{GUEST_BINDS}/bind1", "9p", [*NINEP_OPTIONS, "ro"]),
    ]
    # As the VM serves them: vfkit's are virtiofs (its backend's fit).
    virtiofs = tuple(Share(s.tag, tmp_path, fs="virtiofs") for s in served)
    agent = RecordingAgent()
    asyncio.run(bind_shares.mount(agent, shares, virtiofs))  # type: ignore[arg-type]
    assert [(fs, options) for _, _, fs, options in agent.mounts] == [
        ("virtiofs", []),
        ("virtiofs", ["ro"]),
    ]


def test_a_share_the_vm_lacks_is_an_error_naming_it(tmp_path: Path) -> None:
    agent = RecordingAgent()
    shares = (BindShare("bind0", tmp_path, readonly=False),)
    with pytest.raises(VMError, match=f"the VM has no share 'bind0' for {tmp_path}"):
        asyncio.run(bind_shares.mount(agent, shares, (Share(SHARE_TAG, tmp_path),)))  # type: ignore[arg-type]
    assert agent.mounts == []


# -- the rootfs share on a host without mounts -----------------------------------------


def test_a_host_without_mounts_prepares_and_releases_the_share_without_mountinfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS has no /proc/self/mountinfo, and harpoon mounts nothing there: the share
    goes at stop (where mountinfo cannot be read on Linux, release refuses instead)."""
    monkeypatch.setattr(rootfs, "MOUNTINFO", str(tmp_path / "no-mountinfo"))
    share = tmp_path / "share" / "c1"
    rootfs.prepare(share)
    with pytest.raises(OSError, match="still mounted"):
        rootfs.release(share)
    monkeypatch.setattr(linux, "HAS_BIND_MOUNTS", False)
    rootfs.prepare(share)  # already prepared: kept
    rootfs.release(share)
    assert not share.exists()


def test_a_read_only_binds_share_is_read_only_on_the_host_too_where_the_backend_can() -> None:
    """A file's bind shares its whole directory (the host's /etc for --net-host's
    /etc/hosts): QEMU serves it read-only; vfkit, which cannot, serves it writable
    and the guest's read-only mount holds."""
    from harpoon.sandbox.bind_shares import BindShare
    from harpoon.vmm import vfkit_launch
    from harpoon.vmm.base import VMConfig

    ro, rw = BindShare("bind0", Path("/etc"), True), BindShare("bind1", Path("/srv"), False)
    assert (ro.device().read_only, rw.device().read_only) == (True, False)
    config = VMConfig(
        name="c", arch="amd64", kernel=Path("/k"), initrd=Path("/i"), state_dir=Path("/s"),
        shares=(ro.device(), rw.device()),
    )  # fmt: skip
    assert [share.read_only for share in vfkit_launch.fit(config).shares] == [False, False]
