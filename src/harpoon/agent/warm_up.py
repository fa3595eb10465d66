"""A throw-away container, created and deleted on a spare vCPU right after Hello, when
the guest's code is emulated (QEMU TCG: the host says so in Hello).

TCG translates guest code into host code the first time it runs, and keeps what it
translated only in the QEMU process: a VM restored from a template starts with nothing
translated. Its first `crun create` took ~350 ms where the next one in the same VM took
~70 ms (QEMU's `info jit`: ~34,000 translation blocks for the first, ~1,500 for the
next). This container goes through the same code: the agent's create path, crun from
its sealed copy at the same addresses (harpoon.agent.oci), the kernel's clone,
namespace, mount and cgroup code; it starts while the host is still sending Hello's
answer and the rootfs mounts, and runs on the vCPU the agent is not on, so that the
real container's create finds most of its code translated. With one vCPU it would only
take time from the real create, so it does not run.

The container is shaped like containerd's default spec (`ctr oci spec`): the same
namespaces, mounts, capabilities, rlimits, device rules and masked paths. Its id cannot
be a containerd id (those start with a letter or a digit), its cgroup is not the
container's, and crun deletes both its state and its cgroup.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from harpoon.agent.console import log

if TYPE_CHECKING:
    from harpoon.agent.oci import OciRuntime

CONTAINER_ID = "_warm-up"
CGROUPS_PATH = "/warm-up"
# On the initramfs, as /bin/busybox is: its one executable is a hard link, not a copy.
ROOT = "/var/lib/harpoon/warm-up-root"
BUSYBOX = "/bin/busybox"

_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
_NOSUID_NOEXEC_NODEV = ["nosuid", "noexec", "nodev"]


def _mount(destination: str, fstype: str, source: str, *options: str) -> dict[str, Any]:
    return {"destination": destination, "type": fstype, "source": source, "options": list(options)}


def spec() -> dict[str, Any]:
    """containerd's default spec, running /bin/sh from ROOT."""
    return {
        # As the host's guest spec has them (harpoon.shim.transform.guest_runtime), but
        # in a cgroup of its own.
        "ociVersion": "1.0.2",
        "process": {
            "args": ["/bin/sh"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "capabilities": {
                key: list(_CAPABILITIES) for key in ("bounding", "effective", "permitted")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": ROOT},
        "hostname": "warm-up",
        "mounts": [
            _mount("/proc", "proc", "proc", *_NOSUID_NOEXEC_NODEV),
            _mount("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
            _mount(
                "/dev/pts",
                "devpts",
                "devpts",
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ),
            _mount("/dev/shm", "tmpfs", "shm", *_NOSUID_NOEXEC_NODEV, "mode=1777", "size=65536k"),
            _mount("/dev/mqueue", "mqueue", "mqueue", *_NOSUID_NOEXEC_NODEV),
            _mount("/sys", "sysfs", "sysfs", *_NOSUID_NOEXEC_NODEV, "ro"),
            _mount("/run", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"],
            "cgroupsPath": CGROUPS_PATH,
            "personality": {"domain": "LINUX"},
        },
    }


def spare_vcpu() -> bool:
    return len(os.sched_getaffinity(0)) > 1


def prepare(runtime: OciRuntime) -> list[str] | None:
    """Writes the container's root and bundle, at the agent's start (so that a VM
    template holds them); crun's command to create it, or None when there is no spare
    vCPU to run it on or it cannot be prepared (it is only an optimization)."""
    if not spare_vcpu():
        return None
    try:
        shell = os.path.join(ROOT, "bin", "sh")
        if not os.path.exists(shell):
            os.makedirs(os.path.dirname(shell), exist_ok=True)
            os.link(BUSYBOX, shell)
        return runtime.prepare_rehearsal(CONTAINER_ID, spec())
    except Exception as error:
        log(f"cannot prepare the warm-up container: {error}")
        return None


async def run(runtime: OciRuntime, command: list[str]) -> None:
    """Creates and deletes the container; never raises, but says why it failed."""
    began = time.monotonic()
    try:
        await runtime.rehearse(CONTAINER_ID, command)
    except Exception as error:
        log(f"the warm-up container failed: {error}")
    else:
        log(f"warm-up container created and deleted in {time.monotonic() - began:.3f} s")
