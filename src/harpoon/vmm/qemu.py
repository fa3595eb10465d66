"""The QEMU backend: the QEMU command line and the QEMU process's lifetime.

x86_64 guests run on `-M microvm` (no PCI, no firmware, the ELF vmlinux entered
through PVH so the kernel is not decompressed at every boot); `q35` is the fallback.
arm64 guests run on `-M virt`. The agent channel is a virtio-serial port whose host
end is a unix socket QEMU listens on. The QEMU process is started with a parent-death
signal, so a shim killed with SIGKILL takes its VM with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
from dataclasses import dataclass

from harpoon.vmm import accel
from harpoon.vmm.base import AGENT_PORT_NAME, VirtualMachine, VMConfig, VMError

SOCKET_WAIT_S = 10.0
STOP_GRACE_S = 2.0
BASE_KERNEL_ARGS = ("quiet", "panic=-1", "rdinit=/init", "random.trust_cpu=on")
# On a loaded host the x86 guest cannot calibrate its TSC against the PIT and hangs
# silently before printing anything (about one boot in two under load, measured);
# telling it the frequency skips the calibration.
X86_KERNEL_ARGS = ("tsc_early_khz=2000000",)


@dataclass(frozen=True)
class MachineProfile:
    """What differs between QEMU machine types: binary, machine, device suffix, console."""

    binary: str
    machine: str
    device_suffix: str  # "device" for virtio-mmio, "pci" for PCI machines
    console: str
    cpu_tcg: str | None = None
    kernel_args: tuple[str, ...] = ()


PROFILES: dict[tuple[str, str], MachineProfile] = {
    ("amd64", "microvm"): MachineProfile(
        "qemu-system-x86_64",
        "microvm,rtc=on,x-option-roms=off",
        "device",
        "ttyS0",
        kernel_args=X86_KERNEL_ARGS,
    ),
    ("amd64", "q35"): MachineProfile(
        "qemu-system-x86_64", "q35", "pci", "ttyS0", kernel_args=X86_KERNEL_ARGS
    ),
    ("arm64", "virt"): MachineProfile(
        "qemu-system-aarch64", "virt", "device", "ttyAMA0", cpu_tcg="cortex-a72"
    ),
}
DEFAULT_MACHINE = {"amd64": "microvm", "arm64": "virt"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def profile_for(config: VMConfig) -> MachineProfile:
    machine = config.extra.get("machine", DEFAULT_MACHINE.get(config.arch, ""))
    try:
        return PROFILES[(config.arch, machine)]
    except KeyError:
        raise VMError(
            f"no QEMU machine profile for arch {config.arch!r} machine {machine!r}"
        ) from None


def command_line(config: VMConfig, accelerator: str) -> list[str]:
    """The full QEMU argv for config (pure: no I/O), under the given accelerator."""
    profile = profile_for(config)
    # Cross-architecture guests (arm64 on an x86 host) can only be emulated.
    if config.arch != host_arch():
        accelerator = "tcg"
    args = [
        profile.binary,
        "-M",
        profile.machine,
        "-accel",
        "tcg,thread=multi" if accelerator == "tcg" else accelerator,
        "-m",
        f"{config.memory_mib}M",
        "-smp",
        str(config.cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(config.kernel),
        "-initrd",
        str(config.initrd),
        "-append",
        " ".join(
            (
                f"console={profile.console}",
                *BASE_KERNEL_ARGS,
                *profile.kernel_args,
                *config.kernel_args,
            )
        ),
        "-chardev",
        f"file,id=console,path={config.console_log}",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=agent,path={config.agent_socket},server=on,wait=off",
        "-device",
        f"virtio-serial-{profile.device_suffix}",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-pidfile",
        str(config.pid_file),
    ]
    if accelerator != "tcg":
        args += ["-cpu", "host"]
    elif profile.cpu_tcg:
        args += ["-cpu", profile.cpu_tcg]
    for index, share in enumerate(config.shares):
        readonly = ",readonly=on" if share.read_only else ""
        args += [
            "-fsdev",
            f"local,id=fs{index},path={share.host_path},security_model=none{readonly}",
            "-device",
            f"virtio-9p-{profile.device_suffix},fsdev=fs{index},mount_tag={share.tag}",
        ]
    return args


def _die_with_parent() -> None:
    # Runs in the forked child before exec: QEMU gets SIGKILL if the shim dies.
    from harpoon import linux

    linux.set_parent_death_signal(signal.SIGKILL)
    os.setsid()


class QemuVM(VirtualMachine):
    """A guest running in a QEMU child process of this shim."""

    def __init__(self, config: VMConfig) -> None:
        super().__init__(config)
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return self._process.pid

    async def start(self) -> None:
        profile = profile_for(self.config)
        binary = shutil.which(profile.binary)
        if binary is None:
            raise VMError(f"{profile.binary} not found on PATH: install QEMU")
        argv = command_line(self.config, accel.choose(binary))
        argv[0] = binary
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=open(self.config.state_dir / "vmm.log", "wb"),  # noqa: SIM115 (child owns it)
            preexec_fn=_die_with_parent,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOCKET_WAIT_S
        while not self.config.agent_socket.exists():
            if self._process.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise VMError(
                    f"QEMU for {self.config.name} did not open its agent socket "
                    f"(exit status {self._process.returncode}): {self._vmm_log()}"
                )
            await asyncio.sleep(0.005)

    def _vmm_log(self) -> str:
        try:
            return (self.config.state_dir / "vmm.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def wait(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return await self._process.wait()
