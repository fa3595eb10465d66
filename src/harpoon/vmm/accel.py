"""Chooses QEMU's accelerator by trying it: KVM on Linux, HVF on macOS, else TCG.

The presence of /dev/kvm proves nothing (on our own machines it exists but a guest
cannot run under it: `-cpu host` aborts when QEMU sets the vCPU's MSRs), so the probe
starts a paused, guest-less QEMU with the accelerator and `-cpu host`, lets the vCPU
run for a moment, and keeps the accelerator only if QEMU is still alive. The verdict is
cached per QEMU binary for the host's uptime, because a probe costs about a second.
On macOS the probe's machine is `none`: HVF is set up with the VM, so a QEMU that
starts with it shows Hypervisor.framework is there and this QEMU may use it (one not
signed with the com.apple.security.hypervisor entitlement may not).

The platform is a parameter (sys.platform's word) so that tests can ask for macOS's
choices on Linux.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from harpoon import dirs, private

PROBE_TIMEOUT_S = 5.0
PROBE_RUN_S = 0.5
ACCEL_ENV = "HARPOON_ACCEL"
CACHE_DIR = Path(dirs.run_dir())


def hardware_accelerator(platform: str | None = None) -> str:
    """The hardware accelerator of `platform` (default: this host's)."""
    return "hvf" if (platform or sys.platform) == "darwin" else "kvm"


def probe_argv(qemu: str, accel: str) -> list[str]:
    """The probe's QEMU: paused, no guest, the accelerator with `-cpu host`."""
    machine = "none" if accel == "hvf" else "microvm"
    return [qemu, "-accel", accel, "-cpu", "host", "-M", machine, "-nodefaults",
            "-display", "none", "-S", "-qmp", "stdio"]  # fmt: skip


def probe(qemu: str, accel: str) -> bool:
    """True when a QEMU with this accelerator and `-cpu host` survives starting its vCPU."""
    script = b'{"execute":"qmp_capabilities"}\n{"execute":"cont"}\n'
    try:
        proc = subprocess.Popen(
            probe_argv(qemu, accel),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return False
    assert proc.stdin is not None
    try:
        proc.stdin.write(script)
        proc.stdin.flush()
        proc.wait(PROBE_RUN_S)
        return False  # it exited on its own: the accelerator failed
    except subprocess.TimeoutExpired:
        pass
    except BrokenPipeError:
        proc.wait(PROBE_TIMEOUT_S)
        return False
    try:
        proc.stdin.write(b'{"execute":"quit"}\n')
        proc.stdin.close()
        return proc.wait(PROBE_TIMEOUT_S) == 0
    except (subprocess.TimeoutExpired, BrokenPipeError):
        proc.kill()
        proc.wait()
        return False


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        return _darwin_boot_time()
    return "unknown"


def _darwin_boot_time() -> str:
    """macOS's boot time (sysctl kern.boottime, a struct timeval), as the boot's id."""
    import ctypes

    value = ctypes.create_string_buffer(16)
    size = ctypes.c_size_t(len(value))
    libc = ctypes.CDLL(None)
    if libc.sysctlbyname(b"kern.boottime", value, ctypes.byref(size), None, 0) != 0:
        return "unknown"
    return value.raw[: size.value].hex()


def choose(qemu: str, platform: str | None = None) -> str:
    """The accelerator to run guests with: $HARPOON_ACCEL if set, else the probed one
    (the hardware accelerator of `platform`, default this host's, or TCG)."""
    forced = os.environ.get(ACCEL_ENV)
    if forced:
        return forced
    key = hashlib.sha256(f"{qemu}:{_boot_id()}".encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"accel-{key}"
    try:
        return private.read_file(cache).decode().strip()
    except OSError:
        pass
    hardware = hardware_accelerator(platform)
    verdict = hardware if probe(qemu, hardware) else "tcg"
    try:
        private.directory(CACHE_DIR)
        tmp = cache.with_suffix(f".{os.getpid()}")
        private.write_file(tmp, verdict.encode())
        tmp.replace(cache)
    except OSError:
        pass
    return verdict
