"""What a container reaches of the host: what it was given, nothing else.

Its root filesystem comes through a 9p share of a host directory (harpoon.sandbox.rootfs,
QEMU's `-fsdev local`): `..` stops at the container's root, and a symlink made inside
the container, absolute or relative, resolves in the guest (QEMU never follows one on
the host), so no host file outside the share can be read or written through it. A
container given no network has no way to the host's loopback or addresses: the guest
has no NIC at all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.images import PASSWD
from harpoon.sandbox.rootfs import ROOTFS_NAME
from harpoon.shim import paths
from tests.e2e.test_harpoon_run import RUN_TIMEOUT_S, delete_once_stopped, run, start_sleeper

pytestmark = pytest.mark.vm


class Canaries:
    """Host files a container must not reach, each holding a secret, made where an
    escape would look: a directory of the host's /tmp (an absolute path the container
    tries), beside the container's share (where `..` from the export would lead) and in
    the export itself, next to the rootfs (outside what the container is given)."""

    def __init__(self, host_dir: Path, share: Path) -> None:
        self.secret = f"secret-{secrets.token_hex(8)}"
        self.name = f"canary-{secrets.token_hex(4)}"
        self.host_dir = host_dir
        self.files = [host_dir / "canary", share.parent / self.name, share / self.name]
        for path in self.files:
            path.write_text(self.secret)

    def state(self) -> dict[Path, tuple[str, int]]:
        return {path: (path.read_text(), path.stat().st_mtime_ns) for path in self.files}

    def remove(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="hp-canary-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def escape_script(canaries: Canaries, written: str) -> str:
    """Every way out of the share a container could try, by `..` and by symlinks made
    inside it, reading and writing; then a search of all the container sees for a file
    with the canaries' name. `written` names the files its writes make."""
    host_dir, name = canaries.host_dir, canaries.name
    return f"""
        cd /../../../..; echo "cwd $(pwd)"
        cat /../{name} /../../{name} /../../../{name} /../../share/{name} \\
            ../../..{host_dir}/canary /tmp/../../../..{host_dir}/canary
        ln -s ../../.. /up; ls -a /up/.. /up/../..
        cat /up/{name} /up/../{name} /up/../../share/{name}
        ln -s {host_dir} /hostdir; cat /hostdir/canary
        ln -s {paths.RUN_DIR} /rundir; ls -aR /rundir
        ln -s /etc /x; echo "== passwd"; cat /x/passwd; echo "== end"
        echo escaped > /../../../{written}
        echo escaped > /up/{written}-up
        echo escaped > /up/../../share/{name}
        echo escaped > /hostdir/canary
        mkdir -p {host_dir} && echo escaped > /hostdir/canary
        find / -xdev -name "canary*" -exec cat {{}} +
        true
    """


def test_a_container_reaches_no_host_file_outside_its_share(
    containerd: Containerd, busybox_image: str, container_id: str, host_dir: Path
) -> None:
    start_sleeper(containerd, busybox_image, container_id)
    share = paths.share_dir(containerd.namespace, container_id)
    canaries = Canaries(host_dir, share)
    try:
        before = canaries.state()
        written = f"written-{secrets.token_hex(4)}"
        done = containerd.ctr(
            "task", "exec", "--exec-id", "escape", container_id,
            "sh", "-c", escape_script(canaries, written), timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
        output = done.stdout + done.stderr
        assert canaries.secret not in output
        assert "cwd /\n" in done.stdout
        # /etc through a symlink is the container's /etc, not the host's.
        assert done.stdout.split("== passwd\n", 1)[1].split("== end\n")[0] == PASSWD
        assert canaries.state() == before, "a host file outside the share was written"
        # Every write landed in the container's own root, and nowhere on the host.
        rootfs = share / ROOTFS_NAME
        assert (rootfs / written).read_text() == "escaped\n"
        assert (rootfs / f"{written}-up").read_text() == "escaped\n"
        assert (rootfs / host_dir.relative_to("/") / "canary").read_text() == "escaped\n"
        outside = [Path("/"), Path("/tmp"), share, share.parent, Path(paths.RUN_DIR), host_dir]
        for directory in outside:
            assert not (directory / written).exists() and not (directory / f"{written}-up").exists()
        assert sorted(os.listdir(host_dir)) == ["canary"]
    finally:
        canaries.remove()
        containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id, check=False)
        delete_once_stopped(containerd, container_id, 137, "the sleeper outlived SIGKILL")


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses, loopback first."""
    listing = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = [line.split()[3].split("/")[0] for line in listing.splitlines()]
    return sorted(set(found), key=lambda address: not address.startswith("127."))


def took_connection(listener: socket.socket) -> bool:
    """Whether a connection was waiting on the (non-blocking) listener; it is closed."""
    try:
        peer, _ = listener.accept()
    except BlockingIOError:
        return False
    peer.close()
    return True


# Where QEMU's user-mode network (slirp) would forward to the host's loopback: a guest
# given none must not reach the host there either.
SLIRP_HOST_ALIAS = "10.0.2.2"
CONNECT_TIMEOUT_S = 3


def test_a_container_given_no_network_cannot_reach_the_hosts_loopback_or_addresses(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    listeners: dict[str, socket.socket] = {}
    try:
        for address in host_addresses():
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners[address] = listener
            listener.bind((address, 0))
            listener.listen(8)
            listener.setblocking(False)
        loopback_port = listeners["127.0.0.1"].getsockname()[1]
        # The listener takes connections: a host process gets through at once.
        with socket.create_connection(("127.0.0.1", loopback_port), timeout=5):
            assert took_connection(listeners["127.0.0.1"])
        targets = [(a, listener.getsockname()[1]) for a, listener in listeners.items()]
        targets.append((SLIRP_HOST_ALIAS, loopback_port))
        # nc, not wget: the image's static busybox wget crashes resolving any address
        # (glibc's NSS, under runc just the same).
        script = "".join(
            f"if nc -w {CONNECT_TIMEOUT_S} {address} {port} </dev/null; "
            f"then echo 'connected {address}'; else echo 'no way to {address}'; fi; "
            for address, port in targets
        )
        status, output = run(containerd, busybox_image, container_id, "sh", "-c", script)
        assert status == 0, output
        assert output.splitlines() == [f"no way to {address}" for address, _ in targets]
        reached = [address for address, listener in listeners.items() if took_connection(listener)]
        assert reached == [], "the container reached the host's listeners"
    finally:
        for listener in listeners.values():
            listener.close()
