"""The boot floor: QEMU + harpoon's kernel + a busybox-only initramfs, launch → marker.

The VM is described with harpoon's own `VMConfig` and launched with the argv of
`harpoon.vmm.qemu_launch.command_line`, so machine, accelerator, memory, CPUs, kernel and
kernel arguments are exactly those of a container's VM; only the initramfs differs (it
prints `HARPOON-FLOOR-READY` and powers off) and there is no rootfs share. The console
chardev writes to `config.console_log`, which here is a FIFO we hold open read-write:
QEMU's open of it never blocks and every console byte reaches us as it is written.

The CPython floor (`python_floor_image`) is the same boot with harpoon's own initramfs,
whose /init is replaced by a `python3 -SB` script that prints the marker first thing:
what the guest's interpreter costs before any of harpoon's code runs. An agent written
in Python cannot be ready sooner than that.

A floor VM that does not print its marker in time is killed and reported, never waited
on forever; every VM is killed and its directory removed before `boot_floor` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from harpoon import linux
from harpoon.guest import GuestImage, initramfs
from harpoon.guest.build import INIT_SCRIPT
from harpoon.vmm.base import VMConfig
from harpoon.vmm.qemu_launch import command_line

FLOOR_MARKER = b"HARPOON-FLOOR-READY"
FLOOR_FIGURE = "boot floor: QEMU launch → marker (same kernel, machine, args)"
PYTHON_FLOOR_FIGURE = "CPython floor: the same with harpoon's initramfs, /init = `python3 -SB`"
#: One boot in ~35 printed nothing for 120 s on these machines: give up well before.
FLOOR_BOOT_TIMEOUT_S = 60.0
#: After the marker the guest powers off; QEMU gets this long to exit on its own.
FLOOR_EXIT_TIMEOUT_S = 10.0
CONSOLE_READ_BYTES = 65536
#: Console bytes quoted when a boot fails.
CONSOLE_TAIL_BYTES = 1000
#: /init of the CPython floor: the agent image's own shebang line (its interpreter and
#: flags), the marker, then a power-off (reboot(2) with LINUX_REBOOT_CMD_POWER_OFF) so
#: that QEMU exits by itself.
PYTHON_FLOOR_INIT = (
    INIT_SCRIPT.splitlines()[0].encode()
    + b"""
import os
os.write(1, b"HARPOON-FLOOR-READY\\n")
import ctypes
ctypes.CDLL(None).reboot(0x4321FEDC)
"""
)


@dataclass(frozen=True)
class FloorBoot:
    """One floor boot: seconds from launch to the marker, or why there was none."""

    seconds: float | None
    error: str | None = None


def floor_config(image: GuestImage, state_dir: Path) -> VMConfig:
    """A container VM's config (harpoon's defaults) with the floor initramfs, no shares."""
    return VMConfig(
        name="bench-floor",
        arch=image.arch,
        kernel=image.kernel,
        initrd=image.initrd,
        state_dir=state_dir,
    )


def python_floor_image(image: GuestImage, directory: Path) -> GuestImage:
    """`image` with its initramfs overlaid by PYTHON_FLOOR_INIT as /init, written into
    `directory` (the kernel unpacks concatenated cpio archives in order, later entries
    replacing earlier ones: nothing else of the image changes)."""
    overlay = initramfs.write([initramfs.file("init", PYTHON_FLOOR_INIT, 0o755)])
    initrd = directory / "python-floor.cpio"
    with open(initrd, "wb") as out:
        out.write(image.initrd.read_bytes())
        out.write(overlay)
    return replace(image, initrd=initrd)


def _die_with_parent() -> None:
    # In the child before exec: a benchmark killed with SIGKILL takes its VM with it.
    linux.set_parent_death_signal(signal.SIGKILL)
    os.setsid()


async def boot_floor(image: GuestImage, qemu: str, accelerator: str) -> FloorBoot:
    """Boots the floor once and returns launch → marker."""
    state_dir = Path(tempfile.mkdtemp(prefix="hp-floor-", dir="/tmp"))
    process: asyncio.subprocess.Process | None = None
    console_fd = -1
    loop = asyncio.get_running_loop()
    try:
        config = floor_config(image, state_dir)
        os.mkfifo(config.console_log)
        console_fd = os.open(config.console_log, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        argv = command_line(config, accelerator)
        argv[0] = qemu
        seen = bytearray()
        marker = loop.create_future()

        def on_console() -> None:
            try:
                chunk = os.read(console_fd, CONSOLE_READ_BYTES)
            except BlockingIOError:
                return
            seen.extend(chunk)
            if FLOOR_MARKER in seen and not marker.done():
                marker.set_result(time.monotonic())

        loop.add_reader(console_fd, on_console)
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        exited = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait(
            {marker, exited}, timeout=FLOOR_BOOT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if marker in done:
            ready = marker.result()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), FLOOR_EXIT_TIMEOUT_S)
            return FloorBoot(ready - started)
        tail = bytes(seen[-CONSOLE_TAIL_BYTES:]).decode(errors="replace")
        if exited in done:
            stderr = (
                (await process.stderr.read()).decode(errors="replace") if process.stderr else ""
            )
            return FloorBoot(
                None, f"QEMU exited with status {process.returncode} before the marker: "
                f"{stderr.strip()[-CONSOLE_TAIL_BYTES:]} console: {tail!r}"
            )  # fmt: skip
        return FloorBoot(None, f"no marker within {FLOOR_BOOT_TIMEOUT_S:.0f} s; console: {tail!r}")
    finally:
        if console_fd >= 0:
            loop.remove_reader(console_fd)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if console_fd >= 0:
            os.close(console_fd)
        shutil.rmtree(state_dir, ignore_errors=True)
