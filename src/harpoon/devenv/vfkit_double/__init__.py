"""A test double of vfkit (crc-org/vfkit v0.6.x) on Linux, backed by QEMU.

harpoon's vfkit backend drives vfkit, macOS's Virtualization.framework front end; no
Mac runs here, so this program plays vfkit: the same command line (the parts harpoon
uses, refusing the rest by name), the same REST API, the same lifecycle, with a real
guest behind it -- QEMU with guest RAM in a shared memfd, a real guest vsock through
rust-vmm's vhost-device-vsock, real virtiofs through virtiofsd, virtio-blk disks whose
serial is the deviceId, a virtio-net on the same unixgram protocol vfkit speaks to
gvproxy, the console in a file. Each module cites the vfkit (or Code-Hex/vz) source it
follows.

Modules: `cmdline` and `devices` (the command line, sans-IO), `checks` (what vfkit and
VZ check on disk), `qemu` (the QEMU command line, pure), `launch` (processes and
sockets), `machine` (the VM's states over QMP), `states` (states and REST changes,
sans-IO), `http_wire` and `rest` (the REST API), `vsock` (the vsock sockets' bridge),
`program` (the program, start to exit).

Run it as `python3 -m harpoon.devenv.vfkit_double ARGS...`, or under the name `vfkit`:
`install_wrapper(directory)` writes an executable `vfkit` there that execs this Python
on this package; harpoon's backend runs $HARPOON_VFKIT (default: `vfkit` on PATH).

Known differences from real vfkit:
- QEMU, not VZ: TCG where KVM does not work (any guest architecture other than the
  host's is emulated); x86 guests under TCG get `tsc_early_khz=2000000 tsc=reliable`
  appended to their kernel command line (harpoon.vmm.qemu_launch's reasons); devices
  are virtio-mmio (microvm / virt), not PCI.
- Which Mac it plays follows the kernel: an x86 kernel (ELF or bzImage) makes it an
  Intel Mac, anything else an Apple-silicon Mac where a kernel without the `ARMd`
  magic is refused as vfkit refuses it; HARPOON_VFKIT_DOUBLE_ARCH=amd64|arm64 forces.
- Not run (refused by name): --gui, --nested, --timesync, --ignition, --cloud-init,
  EFI and macOS boot, virtio-serial stdio/pty, virtio-net nat, virtio-blk type=dev,
  and the rosetta, nvme, usb-mass-storage, virtio-input, virtio-gpu, virtio-balloon
  and nbd devices.
- REST over TCP on loopback addresses only.
- A connection to a guest vsock port waits at most 10 s for the guest (tcpproxy's dial
  timeout, which vfkit does not pass on) before it is closed.
- The REST socket is bound before the VM starts, so a socket that cannot be bound is
  an error before any VM runs (vfkit fails on it a moment after starting the VM).
- It dies with its parent (SIGTERM through PR_SET_PDEATHSIG, then vfkit's graceful
  stop), and its QEMU and helpers die with it; real vfkit on macOS outlives a parent
  killed with SIGKILL.
- Guest vsock CID 3 (vhost-device-vsock's, and what VZ guests see).
- Stop (VZ's requestStop) is QEMU's `system_powerdown`, an ACPI power-button press;
  harpoon's guest image powered off on it when tried, a guest that ignores it is
  stopped hard 5 s after a SIGTERM, as vfkit does.
- `/vm/inspect` answers vfkit's JSON (vcpus, memoryBytes, bootloader, devices with
  their "kind"), not VZ's live objects: a NIC's random MAC is not in it (nor in vfkit's).

Faithful, though easy to take for bugs: the console log is truncated when the VM starts
(vfkit opens it with append=false); a host's close or half-close of a vsock connection
is not passed on to the guest (VZ's connection has no CloseWrite), the guest sees it
only when it next writes; an existing vsock socket path is not replaced (a warning, the
port is not exposed) and an existing REST socket path is an error; the pid file stays
after vfkit exits; the sockets stay when vfkit is killed with SIGKILL.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import harpoon

#: The environment variable that names the vfkit program harpoon's backend runs.
VFKIT_ENV = "HARPOON_VFKIT"
PROGRAM_NAME = "vfkit"


def install_wrapper(directory: Path) -> Path:
    """Writes `directory/vfkit`, an executable that execs this Python with `-m
    harpoon.devenv.vfkit_double` (exec: the pid is the double's, as --pidfile says)
    and this harpoon's source on PYTHONPATH; returns its path."""
    source_root = Path(harpoon.__file__).resolve().parent.parent
    wrapper = directory / PROGRAM_NAME
    script = (
        "#!/bin/sh\n"
        "# harpoon's vfkit test double (harpoon.devenv.vfkit_double), installed as vfkit.\n"
        f"PYTHONPATH={shlex.quote(str(source_root))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -m harpoon.devenv.vfkit_double "$@"\n'
    )
    directory.mkdir(parents=True, exist_ok=True)
    temporary = wrapper.with_name(f".{PROGRAM_NAME}.{os.getpid()}")
    temporary.write_text(script)
    temporary.chmod(0o755)
    temporary.replace(wrapper)
    return wrapper
