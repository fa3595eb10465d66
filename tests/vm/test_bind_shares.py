"""Host binds as shares of their own (harpoon.sandbox.bind_shares, the way of a host that
cannot bind mount: macOS), as a real guest mounts them, over 9p and over virtiofs: a
sandbox planned as the shim plans it with HARPOON_BIND_SHARES=1, its bind shares mounted
as Create mounts them, then read, written, refused (EROFS) where read-only, both in the
guest's own mount and through crun's binds in a container, with nothing mounted on the
host and nothing left once the sandbox stops."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harpoon.guest.cache import GuestImage
from harpoon.sandbox import bind_shares, plan
from harpoon.sandbox.bind_shares import GUEST_BINDS, BindShare
from harpoon.vmm import virtiofsd
from tests.vm.test_virtiofs_share import pids_of_virtiofsd_serving

if TYPE_CHECKING:
    from tests.vm.conftest import RunInGuest, StartedSandbox, StartSandbox

pytestmark = pytest.mark.vm

READ_ONLY = "Read-only file system"
CONTAINER_ROOT = "/run/hp-test-root"


def bind(source: Path, destination: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": str(source),
            "options": list(options)}  # fmt: skip


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rw/ and ro/ bound whole; etc/'s hosts and resolv.conf bound alone, read-only."""
    base = tmp_path_factory.mktemp("binds")
    for name in ("rw", "ro", "etc"):
        (base / name).mkdir()
    (base / "rw" / "in.txt").write_text("read-write\n")
    (base / "ro" / "in.txt").write_text("read-only\n")
    (base / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (base / "etc" / "resolv.conf").write_text("nameserver 10.0.2.3\n")
    return base


def host_mounts_naming(*paths: Path) -> list[str]:
    """The host's mounts (of this process's namespace, the shim's) naming a path."""
    with open("/proc/self/mountinfo") as mountinfo:
        return [line for line in mountinfo if any(str(p) in line for p in paths)]


@pytest.fixture(scope="module", params=["9p", "virtiofs"])
def started(
    request: pytest.FixtureRequest, guest: GuestImage, sandboxes: StartSandbox, host: Path
) -> Iterator[StartedSandbox]:
    fs = request.param
    if fs == "virtiofs" and virtiofsd.find() is None:
        if os.environ.get("CI"):
            raise RuntimeError("no virtiofsd: scripts/install-deps builds it")
        pytest.skip("no virtiofsd (scripts/install-deps builds it)")
    spec = {
        "process": {"args": ["sh"]},
        "linux": {"namespaces": [{"type": "mount"}]},
        "mounts": [
            bind(host / "rw", "/rw", "rbind"),
            bind(host / "ro", "/ro", "rbind", "ro"),
            bind(host / "etc" / "hosts", "/etc/hosts", "bind", "ro"),
            bind(host / "etc" / "resolv.conf", "/etc/resolv.conf", "bind", "ro"),
        ],
    }
    share_dirs: list[Path] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(bind_shares.ENV, "1")
        patch.setenv(plan.SHARE_FS_ENV, fs)
        # The environment's template store (templates=None): the plan must not use it.
        with sandboxes(guest, f"bind-shares-{fs}", spec=spec) as started:
            launch = started.plan.launch
            assert launch.store is None and not started.sandbox.restored
            assert {share.fs for share in launch.config.shares} == {fs}
            share_dirs.append(started.sandbox.rootfs_share or Path("/nonexistent"))
            # What Create does (harpoon.shim.transform.mounts: Mounts.with_vm).
            started.sandbox.share_binds(started.plan.binds)
            started.loop.run_until_complete(
                started.sandbox.mount_bind_shares(started.plan.bind_shares)
            )
            yield started
            state_dir = launch.config.state_dir
    # Nothing left: no VM helper serving a bound directory, no state, no share, no mount.
    for directory in (host / "rw", host / "ro", host / "etc"):
        assert pids_of_virtiofsd_serving(directory) == []
    assert not state_dir.exists() and not share_dirs[0].exists()
    assert host_mounts_naming(host, share_dirs[0]) == []


def run(started: StartedSandbox, *args: str) -> tuple[int, str]:
    status, out, err = started.run(*args)
    return status, (out + err).decode()


def test_the_plan_shares_each_directory_once(started: StartedSandbox, host: Path) -> None:
    assert started.plan.binds == ()  # nothing for the host to bind
    assert started.plan.bind_shares == (
        BindShare("bind0", host / "rw", readonly=False),
        BindShare("bind1", host / "ro", readonly=True),
        BindShare("bind2", host / "etc", readonly=True),  # both files' directory
    )


def test_the_guest_mounts_read_only_shares_read_only(started: StartedSandbox) -> None:
    status, mounts = run(started, "/bin/cat", "/proc/mounts")
    assert status == 0
    fs = started.sandbox.config.shares[-1].fs
    found = {}
    for line in mounts.splitlines():
        source, point, fstype, options = line.split()[:4]
        if point.startswith(GUEST_BINDS):
            assert (source, fstype) == (point.rsplit("/", 1)[1], fs), line
            found[point] = options.split(",")[0]
    assert found == {
        f"{GUEST_BINDS}/bind0": "rw",
        f"{GUEST_BINDS}/bind1": "ro",
        f"{GUEST_BINDS}/bind2": "ro",
    }


def test_the_guest_reads_the_shares_and_writes_through_the_read_write_one(
    started: StartedSandbox, host: Path
) -> None:
    script = (
        f"cat {GUEST_BINDS}/bind0/in.txt {GUEST_BINDS}/bind1/in.txt {GUEST_BINDS}/bind2/hosts;"
        f"echo written > {GUEST_BINDS}/bind0/out.txt"
    )
    assert run(started, "/bin/sh", "-c", script) == (
        0,
        "read-write\nread-only\n127.0.0.1 localhost\n",
    )
    assert (host / "rw" / "out.txt").read_text() == "written\n"


def test_the_guests_own_mount_of_a_read_only_share_refuses_writes(
    started: StartedSandbox, host: Path
) -> None:
    """Read-only below crun's binds: a share's host side is writable on vfkit."""
    script = (
        f"echo x > {GUEST_BINDS}/bind1/in.txt; touch {GUEST_BINDS}/bind1/new;"
        f"echo x > {GUEST_BINDS}/bind2/hosts"
    )
    status, said = run(started, "/bin/sh", "-c", script)
    assert status == 1 and said.count(READ_ONLY) == 3, said
    assert sorted(os.listdir(host / "ro")) == ["in.txt"]
    assert (host / "ro" / "in.txt").read_text() == "read-only\n"
    assert (host / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"


def test_a_host_change_to_a_bound_file_is_seen_at_the_next_read(
    started: StartedSandbox, host: Path
) -> None:
    """nerdctl rewrites /etc/hosts in place as its network grows."""
    resolv = host / "etc" / "resolv.conf"
    assert run(started, "/bin/cat", f"{GUEST_BINDS}/bind2/resolv.conf")[1] == resolv.read_text()
    resolv.write_text("nameserver 10.0.2.3\nsearch example.test\n")
    assert run(started, "/bin/cat", f"{GUEST_BINDS}/bind2/resolv.conf") == (
        0,
        "nameserver 10.0.2.3\nsearch example.test\n",
    )


def test_a_container_sees_its_binds_where_the_spec_puts_them(
    started: StartedSandbox, guest_process: RunInGuest, host: Path
) -> None:
    """crun binds the plan's guest paths (a directory, or the one file out of its
    directory's share) with the spec's options: here into a container whose root is the
    guest's own (bound at CONTAINER_ROOT), in a mount namespace of its own."""
    guest_spec = json.loads(started.plan.guest_spec)
    binds = [m for m in guest_spec["mounts"] if m["type"] == "bind"]
    assert [(m["destination"], m["source"]) for m in binds] == [
        ("/rw", f"{GUEST_BINDS}/bind0"),
        ("/ro", f"{GUEST_BINDS}/bind1"),
        ("/etc/hosts", f"{GUEST_BINDS}/bind2/hosts"),
        ("/etc/resolv.conf", f"{GUEST_BINDS}/bind2/resolv.conf"),
    ]
    script = (
        "cat /rw/in.txt /ro/in.txt /etc/hosts /etc/resolv.conf; echo container > /rw/c.txt;"
        "echo x > /ro/in.txt; touch /ro/new; echo x > /etc/hosts"
    )
    agent = started.sandbox.agent
    assert agent is not None
    # The guest's root, bound elsewhere: crun moves its root onto / (the guest's is its
    # initramfs, which cannot be moved), as it moves the container's rootfs share.
    started.loop.run_until_complete(agent.mount("/", CONTAINER_ROOT, "", ["rbind"]))
    running = guest_process(agent, "container", "/bin/sh", "-c", script, mounts=binds,
                            root=CONTAINER_ROOT)  # fmt: skip
    status, out, err = started.loop.run_until_complete(running)
    assert status == 1
    resolv = (host / "etc" / "resolv.conf").read_text()
    assert out.decode() == f"read-write\nread-only\n127.0.0.1 localhost\n{resolv}", err
    assert err.decode().count(READ_ONLY) == 3, err
    assert (host / "rw" / "c.txt").read_text() == "container\n"
    assert sorted(os.listdir(host / "ro")) == ["in.txt"]
    assert (host / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"


def test_nothing_is_mounted_on_the_host(started: StartedSandbox, host: Path) -> None:
    share = started.sandbox.rootfs_share
    assert share is not None
    assert host_mounts_naming(host, share) == []
    assert not (share / "mounts").exists()
