"""A config.json shaped as nerdctl writes it on macOS runs in a VM: through real
containerd (`ctr run --config`), harpoon's shim and the guest's crun
(harpoon.shim.transform.linux_defaults fills in the Linux parts it lacks).

The spec is `nerdctl run --rootfs DIR --network none -v SRC:/data:ro --hostname web sh`
on darwin (tests/unit/test_shim_linux_defaults.py has its shapes from nerdctl's
source): no `linux` section, the bind untyped with options ro and rbind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from tests.e2e.test_harpoon_run import HARPOON, RUN_TIMEOUT_S

pytestmark = pytest.mark.vm

#: containerd's default capabilities (pkg/oci/spec.go defaultUnixCaps), as a CapEff mask.
DEFAULT_CAPS = "00000000a80425fb"
SCRIPT = (
    "uname -m; cat /data/in.txt; "
    "if echo x >/data/written 2>/dev/null; then echo WROTE; else echo REFUSED; fi; "
    "cut -d' ' -f2,3 /proc/mounts | grep -E '^/(proc|dev|dev/pts|sys|sys/fs/cgroup|data) '; "
    "grep CapEff /proc/self/status; ulimit -n; hostname; echo pid $$; echo net $(ls /sys/class/net)"
)


def busybox_rootfs(directory: Path) -> Path:
    """A root of busybox-static alone (what `nerdctl run --rootfs` is given)."""
    (directory / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", directory / "bin" / "busybox")
    for applet in ("sh", "uname", "cat", "cut", "grep", "hostname", "ls", "echo"):
        (directory / "bin" / applet).symlink_to("busybox")
    return directory


def test_a_darwin_spec_runs_with_containerds_linux_defaults(
    containerd: Containerd, container_id: str, tmp_path: Path
) -> None:
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed")
    if containerd.flavour.name != "2.3":
        pytest.skip("the shim's behaviour, not containerd's: one flavour is enough")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from the host\n")
    spec = {
        "ociVersion": "1.2.1",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", SCRIPT],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOSTNAME="],
            "cwd": "/",
        },
        "root": {"path": str(busybox_rootfs(tmp_path / "rootfs"))},
        "mounts": [{"destination": "/data", "source": str(shared), "options": ["ro", "rbind"]}],
        "annotations": {"nerdctl/name": "web", "nerdctl/hostname": "web",
                        "nerdctl/platform": "darwin/arm64"},
    }  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, "--config", str(config), container_id,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:3] == ["from the host", "REFUSED"]
    assert not (shared / "written").exists()
    mounts = dict(line.split(" ", 1) for line in lines[3:9])
    assert mounts == {
        "/proc": "proc", "/dev": "tmpfs", "/dev/pts": "devpts", "/sys": "sysfs",
        "/sys/fs/cgroup": "cgroup2", "/data": "9p",
    }  # fmt: skip
    # Its own pid and network namespaces: pid 1, and loopback alone (`--network none`;
    # the VM's NIC is the guest's, in the guest's own namespace).
    assert lines[9:] == [f"CapEff:\t{DEFAULT_CAPS}", "1024", "web", "pid 1", "net lo"]
