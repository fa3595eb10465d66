"""The QEMU backend: the QEMU command line and the QEMU process's lifetime.

x86_64 guests run on `-M microvm` (no PCI, no firmware, the ELF vmlinux entered
through PVH so the kernel is not decompressed at every boot); `q35` is the fallback.
arm64 guests run on `-M virt`. The agent channel is a virtio-serial port whose host
end is a unix socket QEMU listens on. The QEMU process is started with a parent-death
signal, so a shim killed with SIGKILL takes its VM with it.

Every VM also has a QMP socket (`VMConfig.control_socket`), which saving and restoring
guests use: save = migration of the running guest to `exec:cat > FILE` (QEMU 7.2 has no
`file:` URI; the guest stops as it completes); restore = the same command line plus
`-incoming defer`, the agent socket connected, `migrate-incoming exec:cat FILE`, and the
guest runs by itself once loaded, because it was saved running. Commands that follow
each other go in one write (one round trip). The 9p `-fsdev path=` may name another
host directory at restore than at save: only the device layout counts.

A VM with a `memory_file` has its RAM in a `memory-backend-file`: shared (`share=on`)
when it boots, so the file *is* its RAM, and private (`share=off`: copy on write) when
it is restored. Both ends set the `x-ignore-shared` migration capability, so the saved
state holds the devices only (~60 KB instead of ~100 MB) and a restore loads nothing:
the guest's pages come from the file's page cache as it touches them (Kata's VM
templating does the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harpoon import linux
from harpoon.vmm import accel
from harpoon.vmm.base import (
    AGENT_PORT_NAME,
    STDIO_PORT_NAME,
    VirtualMachine,
    VMConfig,
    VMError,
)
from harpoon.vmm.qmp import QmpClient

log = logging.getLogger(__name__)

SOCKET_WAIT_S = 10.0
SOCKET_RETRY_S = 0.005
STOP_GRACE_S = 2.0
MIGRATION_TIMEOUT_S = 60.0
MIGRATION_POLL_S = 0.005
AGENT_CHANNEL_POLL_S = 0.02
# QEMU's default migration bandwidth (~128 MiB/s) makes saving a guest 10x slower.
MIGRATION_MAX_BANDWIDTH_BYTES_S = 10_000_000_000
AGENT_DEVICE_ID = "agent-port"
MEMORY_BACKEND_ID = "ram"
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
LOWEST_PRIORITY_NICE = 19
# PYTHONHASHSEED=0 reaches /init's environment (the kernel hands unknown `name=value`
# arguments to init): without it the agent's Python reads /dev/urandom for its hash seed
# before the kernel's RNG is seeded, and Linux 6.1 then runs its jitter-entropy loop, one
# bit per timer tick, ~1 s of CPU at every cold boot (measured). The agent drops it from
# its environment; the host's entropy credited at Hello seeds the RNG.
# cryptomgr.notests skips the crypto API's self-tests of every algorithm at boot (~0.5 s
# of CPU under TCG, the largest initcall; they check implementations, they guard nothing).
BASE_KERNEL_ARGS = (
    "quiet",
    "panic=-1",
    "rdinit=/init",
    "random.trust_cpu=on",
    "cryptomgr.notests",
    "PYTHONHASHSEED=0",
)
# On a loaded host the x86 guest cannot calibrate its TSC against the PIT and hangs
# silently before printing anything (about one boot in two under load, measured);
# telling it the frequency skips the calibration.
# tsc=reliable keeps the TSC as the clocksource: otherwise the guest falls back to
# refined-jiffies and its timers (asyncio's included) tick only every 4 ms.
X86_KERNEL_ARGS = ("tsc_early_khz=2000000", "tsc=reliable")


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


@functools.cache
def supported_machines(binary: str) -> frozenset[str]:
    """The machine types this QEMU binary offers (`-M help`), cached on disk per binary
    version: asking QEMU costs ~90 ms, and every shim asks once."""
    cache: Path | None = None
    try:
        info = os.stat(binary)
        key = hashlib.sha256(f"{binary}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}".encode())
        cache = accel.CACHE_DIR / f"machines-{key.hexdigest()[:16]}"
        return frozenset(cache.read_text().split())
    except OSError:
        pass
    try:
        listing = subprocess.run(
            [binary, "-M", "help"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    machines = frozenset(line.split()[0] for line in listing.splitlines()[1:] if line.strip())
    if cache is not None and machines:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache.with_suffix(f".{os.getpid()}")
            temporary.write_text("\n".join(sorted(machines)))
            temporary.replace(cache)
    return machines


def with_available_machine(config: VMConfig, binary: str) -> VMConfig:
    """config, moved from microvm to q35 when this QEMU was built without microvm."""
    if "machine" in config.extra or DEFAULT_MACHINE.get(config.arch) != "microvm":
        return config
    if "microvm" in supported_machines(binary) or "q35" not in supported_machines(binary):
        return config
    return dataclasses.replace(config, extra={**config.extra, "machine": "q35"})


def command_line(config: VMConfig, accelerator: str, *, restoring: bool = False) -> list[str]:
    """The full QEMU argv for config (pure: no I/O), under the given accelerator; a VM
    being restored maps its memory file privately."""
    profile = profile_for(config)
    # Cross-architecture guests (arm64 on an x86 host) can only be emulated.
    if config.arch != host_arch():
        accelerator = "tcg"
    machine = profile.machine
    if config.memory_file is not None:
        machine += f",memory-backend={MEMORY_BACKEND_ID}"
    args = [
        profile.binary,
        "-M",
        machine,
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
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},id={AGENT_DEVICE_ID}",
        "-chardev",
        f"socket,id=stdio,path={config.stdio_socket},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=stdio,name={STDIO_PORT_NAME}",
        "-qmp",
        f"unix:{config.control_socket},server=on,wait=off",
        "-pidfile",
        str(config.pid_file),
    ]
    if accelerator != "tcg":
        args += ["-cpu", "host"]
    elif profile.cpu_tcg:
        args += ["-cpu", profile.cpu_tcg]
    if config.memory_file is not None:
        mapping = "off" if restoring else "on"
        args += [
            "-object",
            f"memory-backend-file,id={MEMORY_BACKEND_ID},size={config.memory_mib}M,"
            f"mem-path={config.memory_file},share={mapping}",
        ]
    for index, share in enumerate(config.shares):
        readonly = ",readonly=on" if share.read_only else ""
        args += [
            "-fsdev",
            # remap: an export may hold mounts of other filesystems (harpoon.sandbox.rootfs),
            # whose inode numbers must not collide in the guest.
            f"local,id=fs{index},path={share.host_path},security_model=none,multidevs=remap"
            f"{readonly}",
            "-device",
            f"virtio-9p-{profile.device_suffix},fsdev=fs{index},mount_tag={share.tag}",
        ]
    return args


def _file_identity(path: str | Path) -> list[int]:
    """Changes whenever the file is replaced or rewritten (no hashing: this runs per start)."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _die_with_parent() -> None:
    # Runs in the forked child before exec: QEMU gets SIGKILL if the shim dies. No
    # imports here: another thread of the shim may hold an import's lock.
    linux.set_parent_death_signal(signal.SIGKILL)
    os.setsid()


def _die_with_parent_at_lowest_priority() -> None:
    _die_with_parent()
    os.nice(LOWEST_PRIORITY_NICE)


class QemuVM(VirtualMachine):
    """A guest running in a QEMU child process of this shim."""

    def __init__(self, config: VMConfig) -> None:
        super().__init__(config)
        self._process: asyncio.subprocess.Process | None = None
        self._qmp_client: QmpClient | None = None
        self._incoming: Path | None = None
        self._emulated = False

    @property
    def emulated(self) -> bool:
        return self._emulated

    @property
    def pid(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return self._process.pid

    def _binary(self) -> str:
        profile = profile_for(self.config)
        binary = shutil.which(profile.binary)
        if binary is None:
            raise VMError(f"{profile.binary} not found on PATH: install QEMU")
        return binary

    async def start(self) -> None:
        await self._launch([])

    async def _launch(self, extra_args: list[str]) -> None:
        binary = self._binary()
        self.config = with_available_machine(self.config, binary)
        argv = command_line(self.config, accel.choose(binary), restoring=bool(extra_args))
        argv[0] = binary
        self._emulated = argv[argv.index("-accel") + 1].startswith("tcg")
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        sockets = (self.config.agent_socket, self.config.stdio_socket, self.config.control_socket)
        # A QEMU that failed (a restore refused its state) leaves its sockets behind, and
        # the wait below must only see the ones this QEMU creates.
        for path in sockets:
            path.unlink(missing_ok=True)
        with open(self.config.state_dir / "vmm.log", "wb") as vmm_log:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                *extra_args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=vmm_log,
                preexec_fn=(
                    _die_with_parent_at_lowest_priority
                    if self.config.low_priority
                    else _die_with_parent
                ),
            )
        log.debug("QEMU %d launched for %s", self._process.pid, self.config.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOCKET_WAIT_S
        while not all(path.exists() for path in sockets):
            if self._process.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise VMError(
                    f"QEMU for {self.config.name} did not open its sockets "
                    f"(exit status {self._process.returncode}): {self._vmm_log()}"
                )
            await asyncio.sleep(0.005)

    def _vmm_log(self) -> str:
        try:
            return (self.config.state_dir / "vmm.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def _qmp(self) -> QmpClient:
        if self._qmp_client is None:
            path = str(self.config.control_socket)
            # QEMU binds its socket a moment before it listens on it.
            for _ in range(int(SOCKET_WAIT_S / SOCKET_RETRY_S)):
                try:
                    self._qmp_client = await QmpClient.connect(path)
                    break
                except ConnectionRefusedError:
                    if self._process is None or self._process.returncode is not None:
                        raise
                    await asyncio.sleep(SOCKET_RETRY_S)
            else:
                self._qmp_client = await QmpClient.connect(path)
        return self._qmp_client

    async def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command; a failure names the VM and carries QEMU's own log."""
        return (await self._execute_all([(command, arguments)]))[0]

    async def _execute_all(self, commands: list[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        """QMP commands sent together, run in order (one round trip); as _execute."""
        try:
            return await (await self._qmp()).execute_all(commands)
        except (VMError, OSError) as error:
            raise VMError(f"VM {self.config.name}: {error}; QEMU said: {self._vmm_log()}") from None

    async def stop(self) -> None:
        await self._end(STOP_GRACE_S)

    async def kill(self) -> None:
        await self._end(0.0)

    async def _end(self, grace_s: float) -> None:
        """Ends QEMU: SIGTERM and up to grace_s for it to go, then SIGKILL."""
        if self._qmp_client is not None:
            await self._qmp_client.close()
            self._qmp_client = None
        process = self._process
        if process is None or process.returncode is not None:
            return
        if grace_s > 0:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), grace_s)
                return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def wait(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return await self._process.wait()

    # -- saved states ------------------------------------------------------------------

    def template_identity(self) -> dict[str, Any] | None:
        try:
            binary = os.path.realpath(self._binary())
            # Host paths that may differ between the template and its restores are
            # replaced by fixed ones; everything else in the command line counts.
            neutral = replace(
                self.config,
                name="template",
                state_dir=Path("/state"),
                shares=tuple(
                    replace(share, host_path=Path(f"/share{index}"))
                    for index, share in enumerate(self.config.shares)
                ),
                low_priority=False,
                memory_file=Path("/memory"),
            )
            argv = command_line(neutral, accel.choose(binary), restoring=True)
            files = {
                str(path): _file_identity(path)
                for path in (binary, self.config.kernel, self.config.initrd)
            }
        except (VMError, OSError) as error:
            log.info("no template identity for %s: %s", self.config.name, error)
            return None
        return {"backend": "qemu", "argv": argv[1:], "files": files}

    async def wait_for_agent_channel(self, timeout_s: float) -> None:
        # The port's chardev "frontend" is open exactly while the guest holds the port
        # open (virtio-console.c: set_guest_connected); the guest agent opens it once
        # its service is registered, so this is "agent ready" without a request.
        async with asyncio.timeout(timeout_s):
            while True:
                chardevs = await self._execute("query-chardev")
                opened = {c.get("label") for c in chardevs if c.get("frontend-open")}
                # Both ports: a guest saved before it opened one would never see its host.
                if {"agent", "stdio"} <= opened:
                    return
                await asyncio.sleep(AGENT_CHANNEL_POLL_S)

    async def save_state(self, path: Path) -> None:
        # Migrated running (QEMU stops the guest as the migration completes), so the
        # saved run state is "running" and a restored guest starts by itself once
        # loaded: no `cont`, no polling for the load to end (see resume()).
        commands: list[tuple[str, dict[str, Any] | None]] = []
        if self.config.memory_file is not None:
            commands.append(("migrate-set-capabilities", IGNORE_SHARED))
        commands += [
            ("migrate-set-parameters", {"max-bandwidth": MIGRATION_MAX_BANDWIDTH_BYTES_S}),
            ("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"}),
        ]
        await self._execute_all(commands)
        await self._await_migration("query-migrate", {"completed"})

    async def _await_migration(self, query: str, done: set[str]) -> str:
        """Polls `query` until its status is one of `done`; a failed migration raises."""
        async with asyncio.timeout(MIGRATION_TIMEOUT_S):
            while True:
                answer = await self._execute(query)
                status = str(answer.get("status", ""))
                if status in done:
                    return status
                if status in ("failed", "cancelled"):
                    raise VMError(
                        f"VM {self.config.name}: migration {status}: "
                        f"{answer.get('error-desc', '')}; QEMU said: {self._vmm_log()}"
                    )
                await asyncio.sleep(MIGRATION_POLL_S)

    async def restore(self, state: Path) -> None:
        if not state.is_file():
            raise VMError(f"no saved guest state at {state}")
        memory = self.config.memory_file
        if memory is not None and not memory.is_file():
            # QEMU would create it: a guest of zeros.
            raise VMError(f"no saved guest memory at {memory}")
        self._incoming = state
        await self._launch(["-incoming", "defer"])

    async def resume(self) -> None:
        if self._incoming is None:
            raise VMError(f"VM {self.config.name} was not started with restore()")
        commands: list[tuple[str, dict[str, Any] | None]] = []
        if self.config.memory_file is not None:
            commands.append(("migrate-set-capabilities", IGNORE_SHARED))
        commands.append(
            ("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(self._incoming))}"})
        )
        # The guest was saved running: it runs as soon as it is loaded. A state QEMU
        # cannot load makes it exit, which closes the agent's connection.
        await self._execute_all(commands)

    async def freeze(self) -> None:
        await self._execute("stop")

    async def thaw(self) -> None:
        await self._execute("cont")
