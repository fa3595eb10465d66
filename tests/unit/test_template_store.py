"""The VM template store and key, without a VM: what is found, what is refused, what is removed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from harpoon.sandbox.template import (
    FORMAT_VERSION,
    LOCK_POLL_S,
    MEMORY_NAME,
    META_NAME,
    SCRATCH_PREFIX,
    STATE_NAME,
    TemplateStore,
    template_key,
)
from harpoon.vmm.backend import QemuBackend
from harpoon.vmm.base import VMConfig
from harpoon.vmm.devices import NIC, Disk, Share, StreamBackend, TapBackend, Vsock


def publish(
    store: TemplateStore, key: str, state: bytes = b"devices", memory: bytes = b"guest memory"
) -> Path:
    directory = store.root / key
    directory.mkdir(parents=True)
    (directory / STATE_NAME).write_bytes(state)
    (directory / MEMORY_NAME).write_bytes(memory)
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "state_bytes": len(state),
        "memory_bytes": len(memory),
    }
    (directory / META_NAME).write_text(json.dumps(meta))
    return directory


def config(tmp_path: Path, **overrides: object) -> VMConfig:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    for path in (kernel, initrd):
        if not path.exists():
            path.write_bytes(b"image")
    values: dict[str, object] = dict(
        name="c1",
        arch="amd64",
        kernel=kernel,
        initrd=initrd,
        state_dir=tmp_path / "state-a",
        shares=(Share("rootfs", tmp_path / "rootfs-a"),),
    )
    values.update(overrides)
    return VMConfig(**values)  # type: ignore[arg-type]


def key_of(vm_config: VMConfig) -> str:
    identity = QemuBackend().template_identity(vm_config)
    if identity is None:
        pytest.skip("no QEMU on this host")
    return template_key(identity)


def test_key_ignores_host_paths_that_differ_at_restore(tmp_path: Path) -> None:
    one = config(tmp_path)
    other = config(
        tmp_path, name="c2", state_dir=tmp_path / "b", shares=(Share("rootfs", tmp_path / "b"),)
    )
    assert key_of(one) == key_of(other)


def devices(tmp_path: Path, name: str, mac: str) -> dict[str, object]:
    """A VM with one of every device, its per-instance values taken from name and mac."""
    return {
        "disks": (
            Disk("layer0", tmp_path / f"{name}.erofs"),
            Disk("rw", tmp_path / f"{name}.ext4", read_only=False),
        ),
        "nics": (NIC("eth0", mac, TapBackend(f"tap-{name}")),),
        "vsock": Vsock(3 + len(name)),
    }


def test_key_ignores_disk_files_tap_names_and_vsock_cids(tmp_path: Path) -> None:
    one = config(tmp_path, **devices(tmp_path, "a", "02:00:00:00:00:0a"))
    other = config(
        tmp_path,
        name="c2",
        shares=(Share("rootfs", tmp_path / "b"),),
        **devices(tmp_path, "bb", "02:00:00:00:00:0a"),
    )
    assert key_of(one) == key_of(other)


def test_a_nics_mac_is_part_of_the_key(tmp_path: Path) -> None:
    # A restored guest's NIC keeps its template's MAC: another MAC is another template.
    one = config(tmp_path, **devices(tmp_path, "a", "02:00:00:00:00:0a"))
    other = config(tmp_path, **devices(tmp_path, "a", "02:00:00:00:00:0b"))
    assert key_of(one) != key_of(other)


@pytest.mark.parametrize(
    "layout",
    [
        {"disks": (Disk("layer0", Path("/a.erofs")),)},
        {"disks": (Disk("layer0", Path("/a.erofs"), read_only=False),)},
        {"disks": (Disk("layer1", Path("/a.erofs")),)},
        {"nics": (NIC("eth0", "02:00:00:00:00:01", TapBackend("tap0")),)},
        {"nics": (NIC("eth0", "02:00:00:00:00:01", StreamBackend(Path("/gv.sock"))),)},
        {"vsock": Vsock(3)},
        {"shares": (Share("rootfs", Path("/r")), Share("vol0", Path("/v")))},
    ],
)
def test_another_device_layout_is_another_key(tmp_path: Path, layout: dict[str, object]) -> None:
    keys = {key_of(config(tmp_path))}
    for other in (config(tmp_path, **layout), config(tmp_path, **{**layout, "cpus": 2})):
        keys.add(key_of(other))
    assert len(keys) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mib": 512},
        {"cpus": 2},
        {"kernel_args": ("debug",)},
        {"shares": ()},
        {"shares": (Share("data", Path("/x")),)},
        {"machine": "q35"},
    ],
)
def test_key_changes_with_what_the_saved_state_depends_on(
    tmp_path: Path, change: dict[str, object]
) -> None:
    assert key_of(config(tmp_path)) != key_of(config(tmp_path, **change))


def test_key_changes_with_read_only_flags_and_a_rewritten_initrd(tmp_path: Path) -> None:
    base = key_of(config(tmp_path))
    read_only = config(tmp_path, shares=(Share("rootfs", tmp_path / "r", read_only=True),))
    assert key_of(read_only) != base
    (tmp_path / "initrd").write_bytes(b"a new image")
    assert key_of(config(tmp_path)) != base


def test_harpoon_template_build_makes_the_template_a_container_without_limits_restores(
    tmp_path: Path,
) -> None:
    """`harpoon template build` and the shim's Create plan their VMs with the same
    function; a container with a memory limit gets a VM of another size."""
    from harpoon.guest.cache import GuestImage
    from harpoon.shim.bundle import Bundle
    from harpoon.shim.container_plan import plan_container
    from harpoon.shim.template_cli import container_config

    base = config(tmp_path)
    backend = QemuBackend()
    image = GuestImage("amd64", base.kernel, base.initrd, "6.1.0-test", "digest")

    def planned(container_id: str, spec: dict[str, object]) -> VMConfig:
        bundle = Bundle(tmp_path / container_id, {"process": {"args": ["sh"]}, **spec})
        plan = plan_container("default", container_id, bundle, image, backend, templates=False)
        return plan.launch.config

    template = key_of(container_config(image, backend))
    assert template == key_of(planned("c1", {}))
    limited = {"linux": {"resources": {"memory": {"limit": 1 << 30}}}}
    assert template != key_of(planned("c2", limited))
    # `ctr run`'s containers, in a network namespace of their own: a tap NIC, not gvproxy's.
    netns = {"linux": {"namespaces": [{"type": "network"}]}}
    own = key_of(container_config(image, backend, netns))
    assert own == key_of(planned("c3", netns)) != template


def test_a_whole_template_is_found(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    directory = publish(store, "k1")
    found = store.find("k1")
    assert found is not None and found.state == directory / STATE_NAME
    assert store.find("k2") is None


@pytest.mark.parametrize(
    "damage",
    ["truncated", "no meta", "bad meta", "old format", "no state", "no memory", "short memory"],
)
def test_a_damaged_template_is_not_found(tmp_path: Path, damage: str) -> None:
    store = TemplateStore(tmp_path)
    directory = publish(store, "k1")
    meta = directory / META_NAME
    if damage == "truncated":
        (directory / STATE_NAME).write_bytes(b"guest")
    elif damage == "no meta":
        meta.unlink()
    elif damage == "bad meta":
        meta.write_text("{not json")
    elif damage == "old format":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 0}))
    elif damage == "no memory":
        (directory / MEMORY_NAME).unlink()
    elif damage == "short memory":
        (directory / MEMORY_NAME).write_bytes(b"guest")
    else:
        (directory / STATE_NAME).unlink()
    assert store.find("k1") is None


def test_discard_removes_the_template_and_leaves_nothing(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    publish(store, "k1")
    found = store.find("k1")
    assert found is not None
    store.discard(found)
    store.discard(found)  # twice (two shims failing at once) is fine
    assert list(tmp_path.iterdir()) == []


def test_publishing_replaces_a_stale_template_and_prunes_the_least_recently_used(
    tmp_path: Path,
) -> None:
    store = TemplateStore(tmp_path)
    for index, key in enumerate(["old1", "old2", "old3", "old4", "k1"]):
        directory = publish(store, key)
        os.utime(directory / META_NAME, (index, index))
    staging = tmp_path / ".build-1-x"
    staging.mkdir()
    (staging / STATE_NAME).write_bytes(b"new")
    (staging / META_NAME).write_text("{}")
    template = store._publish(staging, "k1")
    assert (template.state).read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1", "old2", "old3", "old4"]


def test_pruning_leaves_the_templates_of_another_install_sharing_the_store(
    tmp_path: Path,
) -> None:
    """Two installs (two guest images) share /var/lib/harpoon/templates: publishing one
    install's templates never prunes the other's for being old."""
    store = TemplateStore(tmp_path)
    ours, theirs = "/var/lib/harpoon/guest/amd64/aaa", "/opt/other/guest/amd64/bbb"
    keys = [("theirs1", theirs), ("theirs2", theirs), ("old1", ours), ("old2", ours),
            ("old3", ours), ("old4", ours), ("k1", ours)]  # fmt: skip
    for index, (key, image) in enumerate(keys):
        directory = publish(store, key)
        meta = json.loads((directory / META_NAME).read_text())
        (directory / META_NAME).write_text(json.dumps({**meta, "image": image}))
        os.utime(directory / META_NAME, (index, index))
    staging = tmp_path / ".build-1-x"
    staging.mkdir()
    (staging / META_NAME).write_text(json.dumps({"image": ours}))
    store._publish(staging, "k1")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["k1", "old2", "old3", "old4", "theirs1", "theirs2"]


def test_publishing_removes_templates_whose_guest_image_is_gone(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    image = tmp_path / "initrd"
    image.write_bytes(b"image")
    for key, files in (("gone", [str(tmp_path / "deleted-initrd")]), ("here", [str(image)])):
        directory = publish(store, key)
        meta = json.loads((directory / META_NAME).read_text())
        meta["identity"] = {"files": {path: [1, 2, 3] for path in files}}
        (directory / META_NAME).write_text(json.dumps(meta))
    staging = store.root / ".build-1-x"
    staging.mkdir()
    (staging / META_NAME).write_text("{}")
    store._publish(staging, "new")
    assert sorted(p.name for p in store.root.iterdir()) == ["here", "new"]


def test_staging_of_a_dead_builder_is_removed_and_ours_never_outlives_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    store_root, scratch_root = tmp_path / "store", tmp_path / "tmp"
    store_root.mkdir()
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    leftover = store_root / f".build-{process.pid}-abcd"
    leftover.mkdir()
    (leftover / STATE_NAME).write_bytes(b"half")
    # Its VMs' directory (sockets, pid file), and a live builder's, which stays.
    dead_scratch = scratch_root / f"{SCRATCH_PREFIX}{process.pid}-x1"
    live_scratch = scratch_root / f"{SCRATCH_PREFIX}{os.getpid()}-x2"
    for directory in (dead_scratch, live_scratch):
        directory.mkdir()
        (directory / "vmm.pid").write_text("1")
    store = TemplateStore(store_root)
    with pytest.raises(RuntimeError), store._staging() as staging:
        assert staging.is_dir() and not leftover.exists()
        raise RuntimeError("the build failed")
    assert list(store_root.iterdir()) == []
    assert list(scratch_root.iterdir()) == [live_scratch]


def test_a_builder_waits_until_the_lock_is_let_go(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    events: list[str] = []

    async def second() -> None:
        async with store._lock():
            events.append("second holds it")

    async def scenario() -> None:
        async with store._lock():
            waiting = asyncio.ensure_future(second())
            await asyncio.sleep(LOCK_POLL_S * 5)  # a window for the second to get it too early
            events.append("first lets go")
        await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())
    assert events == ["first lets go", "second holds it"]


def test_templates_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARPOON_TEMPLATE_DIR", str(tmp_path))
    store = TemplateStore.from_environment()
    assert store is not None and store.root == tmp_path
    monkeypatch.setenv("HARPOON_TEMPLATES", "off")
    assert TemplateStore.from_environment() is None


def test_per_key_lock_files_of_older_versions_are_removed(tmp_path: Path) -> None:
    """One build lock for every key: older versions left a lock file per key, for ever."""
    old = [tmp_path / f"{key}.lock" for key in ("0f23e4d85af9faa21afb92a6", "k2")]
    for path in old:
        path.touch()
    store = TemplateStore(tmp_path)

    async def scenario() -> None:
        async with store._lock():
            with store._staging():
                pass

    asyncio.run(scenario())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.lock"]


def test_harpoon_template_build_plans_9p_shares_whatever_cold_boots_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template cannot hold a virtiofs device (QEMU 7.2): HARPOON_SHARE_FS=virtiofs
    for the shims' cold boots leaves `harpoon template build` on 9p."""
    from harpoon.guest.cache import GuestImage
    from harpoon.shim.template_cli import container_config

    monkeypatch.setenv("HARPOON_SHARE_FS", "virtiofs")
    base = config(tmp_path)
    image = GuestImage("amd64", base.kernel, base.initrd, "6.1.0-test", "digest")
    shares = container_config(image, QemuBackend()).shares
    assert shares and {share.fs for share in shares} == {"9p"}


def buildkit_run_step_spec(tmp_path: Path, network: str) -> dict[str, object]:
    """The config.json buildkitd v0.32.2's containerd worker hands harpoon for a RUN step
    (captured here, trimmed of what a VM's layout never depends on: capabilities,
    seccomp, env): no network namespace for its default network in "host" mode, a new
    one for `RUN --network=none`; /etc/resolv.conf and /etc/hosts bound from its root,
    a build secret bound from its secrets mount, its OpenTelemetry socket."""
    root = tmp_path / "buildkit"
    (root / "secrets").mkdir(parents=True)
    for name in ("resolv.conf", "hosts.orncihmltl91imij5m5frx9ch", "secrets/s"):
        (root / name).write_text("x\n")
    import socket

    otel = socket.socket(socket.AF_UNIX)
    otel.bind(str(root / "otel-grpc.sock"))
    otel.close()
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network == "none":
        namespaces.append({"type": "network"})
    bind = ["nosuid", "noexec", "nodev", "rbind", "ro"]
    return {
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["/bin/sh", "-c", "echo hi > /x"],
                    "cwd": "/"},
        "root": {"path": "rootfs"},
        "hostname": "buildkitsandbox",
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": "/buildkit/8s3rhquqi28nql01uflxt5uw3",
            "namespaces": namespaces,
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": str(root / "resolv.conf"), "options": bind},
            {"destination": "/etc/hosts", "type": "bind",
             "source": str(root / "hosts.orncihmltl91imij5m5frx9ch"), "options": bind},
            {"destination": "/run/secrets/s", "type": "bind",
             "source": str(root / "secrets/s"), "options": bind},
            {"destination": "/dev/otel-grpc.sock", "type": "bind",
             "source": str(root / "otel-grpc.sock"), "options": ["ro", "rbind"]},
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("network", "template_spec"),
    [("host", "the host's network"), ("none", "a network namespace")],
)
def test_a_buildkit_run_step_restores_a_template_harpoon_template_build_makes(
    tmp_path: Path, network: str, template_spec: str
) -> None:
    """Issue 16: every BuildKit RUN step booted cold. Its VM is the plain layout of
    `harpoon template build` (a step has no limits; its binds go through the rootfs
    share, not devices of their own): a gvproxy NIC for the host's network, a tap for
    `--network=none`. And the template a cold-booted step has built behind it
    (harpoon.sandbox.template_builder, which gets the neutral config as JSON) has that
    same key: the builder dropped the NIC's gvproxy flag before a79625b, so the
    template it made for a host-network step was of another key, never restored."""
    from harpoon.guest.cache import GuestImage
    from harpoon.sandbox.template_builder import config_from_json, config_to_json
    from harpoon.shim.bundle import Bundle
    from harpoon.shim.container_plan import plan_container
    from harpoon.shim.template_cli import _PLAIN_SPECS, container_config

    base = config(tmp_path)
    backend = QemuBackend()
    image = GuestImage("amd64", base.kernel, base.initrd, "6.1.0-test", "digest")
    bundle = Bundle(tmp_path / "step", buildkit_run_step_spec(tmp_path, network))
    step = plan_container("default", "step", bundle, image, backend, templates=False)
    template = key_of(container_config(image, backend, _PLAIN_SPECS[template_spec]))
    assert key_of(step.launch.config) == template
    built, _ = config_from_json(config_to_json(step.launch.config.neutral(), backend.name))
    assert key_of(built) == template
