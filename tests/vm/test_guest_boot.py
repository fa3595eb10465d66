"""Boot the built guest images under QEMU (TCG) and check their console markers.

The selftest boot imports the agent's whole module closure in the real guest, so a
stdlib module or shared library missing from the image fails here, not in production.
The small QEMU launcher below is temporary: harpoon.vmm.qemu will replace it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.floor import python_floor_image
from harpoon.guest import GuestImage, build_floor_image, build_guest, initramfs
from harpoon.guest.build import FLOOR_MARKER, MODULES_MAP_PATH, SELFTEST_MARKER

pytestmark = pytest.mark.vm

BOOT_TIMEOUT_S = 90
GUEST_MEMORY_MIB = 512
# Without it the x86 kernel calibrates the TSC against the PIT, which under a loaded TCG
# host fails now and then and hangs the boot before any output.
X86_APPEND = "console=ttyS0 quiet panic=-1 tsc_early_khz=2000000"
ARM64_APPEND = "console=ttyAMA0 quiet panic=-1"


def qemu_command(image: GuestImage, extra_append: str = "") -> list[str]:
    if image.arch == "amd64":
        machine = ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg"]
        append = X86_APPEND
    else:
        machine = ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-accel", "tcg"]
        append = ARM64_APPEND
    return [
        *machine,
        "-m", str(GUEST_MEMORY_MIB),
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", f"{append} {extra_append}".strip(),
        "-nographic", "-no-reboot",
    ]  # fmt: skip


@dataclass(frozen=True)
class Boot:
    seconds_to_marker: float | None  # None: the marker never came
    console: str


def boot_once(command: list[str], marker: str, timeout_s: float) -> Boot:
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    console = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while (left := started + timeout_s - time.monotonic()) > 0:
                if selector.select(left) and (chunk := process.stdout.read()):
                    console += chunk
                    if marker.encode() in console:
                        return Boot(time.monotonic() - started, console.decode(errors="replace"))
                elif process.poll() is not None:
                    break
        return Boot(None, console.decode(errors="replace"))
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def boot(image: GuestImage, marker: str, extra_append: str = "") -> Boot:
    """Boot to `marker`, retrying once: one TCG boot in a few dozen hangs here."""
    command = qemu_command(image, extra_append)
    result = boot_once(command, marker, BOOT_TIMEOUT_S)
    if result.seconds_to_marker is None:
        result = boot_once(command, marker, BOOT_TIMEOUT_S)
    assert result.seconds_to_marker is not None, f"no {marker} on the console:\n{result.console}"
    return result


def need_qemu(arch: str) -> None:
    binary = "qemu-system-x86_64" if arch == "amd64" else "qemu-system-aarch64"
    if shutil.which(binary) is None:
        pytest.skip(f"needs {binary}")


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_guest_imports_the_agent_in_a_real_boot(arch: str) -> None:
    need_qemu(arch)
    image = build_guest(arch)

    result = boot(image, SELFTEST_MARKER, "harpoon.selftest=1")

    assert "harpoon-init: insmod" not in result.console  # every boot module loaded
    assert "protobuf implementation: upb" in result.console  # the C one, not pure Python
    print(f"{arch}: launch to {SELFTEST_MARKER} in {result.seconds_to_marker:.2f} s")


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_floor_image_boots_to_its_marker(arch: str) -> None:
    need_qemu(arch)
    image = build_floor_image(arch)

    result = boot(image, FLOOR_MARKER)

    print(f"{arch}: launch to {FLOOR_MARKER} in {result.seconds_to_marker:.2f} s")


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_cpython_floor_prints_its_marker_from_python_and_powers_off(
    arch: str, tmp_path: Path
) -> None:
    """bench's CPython floor: the agent image with a /init that only prints the marker."""
    need_qemu(arch)
    image = python_floor_image(build_guest(arch), tmp_path)
    # The agent's own /init is gone: its selftest argument now changes nothing.
    command = qemu_command(image, "harpoon.selftest=1")

    for attempt in (1, 2):  # one TCG boot in a few dozen hangs here
        try:
            done = subprocess.run(command, capture_output=True, timeout=BOOT_TIMEOUT_S)
            break
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise
    console = done.stdout.decode(errors="replace")

    assert done.returncode == 0, console  # powered off, not killed or crashed
    assert FLOOR_MARKER in console
    assert SELFTEST_MARKER not in console and "harpoon-init" not in console


def with_init(image: GuestImage, script: str, directory: Path) -> GuestImage:
    """The same image with another /init (for tests that need the guest to do more)."""
    entries = dict(initramfs.read(image.initrd.read_bytes()))
    entries["init"] = initramfs.file("init", script.encode(), 0o755)
    initrd = directory / f"{image.arch}-test.cpio"
    initrd.write_bytes(initramfs.write(entries.values()))
    return dataclasses.replace(image, initrd=initrd)


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_every_shipped_module_loads_with_its_dependencies(arch: str, tmp_path: Path) -> None:
    """modules.json gives, for each module, the insmod order the agent will use later."""
    need_qemu(arch)
    image = build_guest(arch)
    members = initramfs.read(image.initrd.read_bytes())
    dependency_map = json.loads(members[MODULES_MAP_PATH].data)
    order = list(dict.fromkeys(path for paths in dependency_map.values() for path in paths))
    script = "\n".join(
        [
            "#!/bin/sh",
            "mount -t proc proc /proc",
            *(f"insmod {path} || echo MODULE-FAILED {path}" for path in order),
            "echo MODULES-DONE $(wc -l < /proc/modules)",
            "poweroff -f",
        ]
    )

    result = boot(with_init(image, script, tmp_path), "MODULES-DONE")

    assert "MODULE-FAILED" not in result.console, result.console
    assert set(dependency_map) >= {"virtio_console", "9pnet_virtio", "9p"}


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_crun_runs_in_the_guest(arch: str, tmp_path: Path) -> None:
    """crun and its shared libraries are in each architecture's image."""
    need_qemu(arch)
    image = build_guest(arch)
    script = "\n".join(
        [
            "#!/bin/sh",
            "mount -t proc proc /proc",  # crun re-executes itself from /proc/self/exe
            "/usr/bin/crun --version",
            "echo CRUN-STATUS=$? CRUN-END",
            "poweroff -f",
        ]
    )

    result = boot(with_init(image, script, tmp_path), "CRUN-END")

    assert "crun version 1.8.1" in result.console, result.console
    assert "CRUN-STATUS=0" in result.console, result.console
