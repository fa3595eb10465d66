"""The one seam between harpoon and a VMM: a Backend makes VMs of a VMConfig.

Everything outside harpoon.vmm reaches a VMM through this module: which backend runs
on this host (`default_backend`), the host's architecture, a VM's template identity,
the early launch a shim makes before it has loaded asyncio, and the VMs themselves.
No module outside harpoon.vmm names QEMU, its files or its flags (an import-linter
contract in pyproject.toml holds it). The second backend, vfkit (macOS's
Virtualization.framework: harpoon.vmm.vfkit), is a subclass here and a choice
(`default_backend`: harpoon.vmm.choice), nothing more.

Importing this module loads no event loop: the shim's daemon calls `launch_early`
first thing (harpoon.shim.daemon).
"""

from __future__ import annotations

import abc
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon.vmm.base import VirtualMachine, VMConfig
from harpoon.vmm.choice import BACKEND_NAMES

if TYPE_CHECKING:
    from harpoon.vmm import qemu_launch, vfkit_launch


def host_arch() -> str:
    """The host's architecture in Debian's and OCI's words (amd64, arm64)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64"}.get(machine, machine)


@dataclass(frozen=True)
class HostVMM:
    """What `harpoon doctor` reports of a backend on this host: its VMM program (None
    when it is not installed), the accelerator it would run guests with, and the fix."""

    program: str
    path: str | None
    accelerator: str | None
    install_hint: str


class Backend(abc.ABC):
    """Makes the VMs of one VMM. An instance may hold one VM launched early (before the
    event loop exists): the first VM made for exactly that launch runs it."""

    name: str

    def host_arch(self) -> str:
        return host_arch()

    @abc.abstractmethod
    def new_vm(self, config: VMConfig) -> VirtualMachine:
        """A VM for config, not yet started."""

    def template_identity(self, config: VMConfig) -> dict[str, Any] | None:
        """What a saved state of a VM of config depends on: the backend, its version and
        files, and config's layout (never a per-instance value: VMConfig.neutral), as
        JSON-able data; None when this backend cannot save and restore. Cheap: no VM is
        started."""
        return None

    def serves_virtiofs(self) -> bool:
        """Whether this backend can give a VM virtiofs shares (cheap: no VM started)."""
        return False

    def fit(self, config: VMConfig) -> VMConfig:
        """config, with what this backend needs changed to run it (a machine with room
        for its devices); cheap, and the same answer for the same config."""
        return config

    def host_vmm(self) -> HostVMM:
        """This backend's VMM on this host (may probe the accelerator: ~1 s, cached)."""
        raise NotImplementedError(f"the {self.name} backend does not describe its VMM")

    @abc.abstractmethod
    def launch_early(self, config: VMConfig, restoring: Path | None) -> None:
        """Launches the VMM for config now, without an event loop (booting, or waiting
        to load the saved state `restoring`); the VM made for it later takes it.
        Raises VMError or OSError if it could not be launched."""

    @abc.abstractmethod
    async def discard_early(self) -> None:
        """Ends the early launch unless a VM took it; idempotent."""


class QemuBackend(Backend):
    """QEMU: KVM, HVF or TCG (harpoon.vmm.qemu_launch, harpoon.vmm.qemu)."""

    name = "qemu"

    def __init__(self) -> None:
        self._early: qemu_launch.Prelaunched | None = None

    def new_vm(self, config: VMConfig) -> VirtualMachine:
        from harpoon.vmm.qemu import QemuVM

        return QemuVM(config, prelaunched=self._early)

    def template_identity(self, config: VMConfig) -> dict[str, Any] | None:
        from harpoon.vmm import qemu_launch

        return qemu_launch.template_identity(config)

    def serves_virtiofs(self) -> bool:
        from harpoon.vmm import virtiofsd

        return virtiofsd.find() is not None

    def fit(self, config: VMConfig) -> VMConfig:
        from harpoon.vmm import qemu_launch

        return qemu_launch.with_room_for_devices(config)

    def host_vmm(self) -> HostVMM:
        import shutil

        from harpoon.vmm import accel, qemu_launch

        arch = self.host_arch()
        program = qemu_launch.PROFILES[(arch, qemu_launch.DEFAULT_MACHINE[arch])].binary
        path = shutil.which(program)
        package = "qemu-system-x86" if arch == "amd64" else "qemu-system-arm"
        hint = f"apt-get install {package} (or run scripts/install-deps)"
        if sys.platform == "darwin":
            hint = "brew install qemu"
        return HostVMM(
            program=program,
            path=path,
            accelerator=accel.choose(path) if path else None,
            install_hint=hint,
        )

    def launch_early(self, config: VMConfig, restoring: Path | None) -> None:
        from harpoon.vmm import qemu_launch

        if self._early is not None:
            raise RuntimeError("this backend has launched a VM early already")
        self._early = qemu_launch.Prelaunched(qemu_launch.launch(config, restoring))

    async def discard_early(self) -> None:
        if self._early is not None:
            await self._early.discard()


class VfkitBackend(Backend):
    """vfkit: macOS's Virtualization.framework, one vfkit process per VM
    (harpoon.vmm.vfkit_launch, harpoon.vmm.vfkit). It cannot save or restore a guest
    (vfkit issue #449): no VM templates, every VM boots cold (template_identity is
    None). Its shares are virtiofs (fit), its NICs gvproxies of their own; it refuses
    tap NICs and read-only shares (harpoon.vmm.vfkit_launch says why)."""

    name = "vfkit"

    def __init__(self, program: str | None = None) -> None:
        """program: the vfkit to run unless $HARPOON_VFKIT names one; None: the one
        harpoon's config file names (`[vmm] vfkit`), else PATH's."""
        self._configured = program
        self._early: vfkit_launch.Prelaunched | None = None

    def program(self) -> str | None:
        """The vfkit this backend runs; None when there is none."""
        from harpoon.vmm import choice, vfkit_launch

        configured = self._configured
        if configured is None and (settings := choice.read_config()) is not None:
            configured = settings.vfkit
        return vfkit_launch.find_program(configured)

    def new_vm(self, config: VMConfig) -> VirtualMachine:
        from harpoon.vmm.vfkit import VfkitVM

        return VfkitVM(config, self._required_program(), prelaunched=self._early)

    def _required_program(self) -> str:
        from harpoon.vmm.base import VMError
        from harpoon.vmm.vfkit_launch import PROGRAM_ENV

        program = self.program()
        if program is None:
            raise VMError(f"vfkit not found (brew install vfkit; or set {PROGRAM_ENV})")
        return program

    def serves_virtiofs(self) -> bool:
        return True

    def fit(self, config: VMConfig) -> VMConfig:
        from harpoon.vmm import vfkit_launch

        return vfkit_launch.fit(config)

    def host_vmm(self) -> HostVMM:
        path = self.program()
        # vfkit runs only on macOS: elsewhere this is harpoon's test double, which runs
        # its guests in QEMU under TCG (harpoon.vmm.vfkit: `emulated`).
        accelerator = "Virtualization.framework" if sys.platform == "darwin" else "tcg"
        return HostVMM(
            program="vfkit",
            path=path,
            accelerator=accelerator if path else None,
            install_hint="brew install vfkit",
        )

    def launch_early(self, config: VMConfig, restoring: Path | None) -> None:
        from harpoon.vmm import vfkit_launch
        from harpoon.vmm.base import VMError

        if restoring is not None:
            raise VMError(f"VM {config.name}: vfkit cannot restore a saved guest (vfkit #449)")
        if self._early is not None:
            raise RuntimeError("this backend has launched a VM early already")
        launched = vfkit_launch.launch(config, self._required_program())
        self._early = vfkit_launch.Prelaunched(launched)

    async def discard_early(self) -> None:
        if self._early is not None:
            await self._early.discard()


def backend_named(name: str) -> Backend:
    if name == QemuBackend.name:
        return QemuBackend()
    if name == VfkitBackend.name:
        return VfkitBackend()
    raise ValueError(f"no VMM backend {name!r}: harpoon has {', '.join(BACKEND_NAMES)}")


def default_backend() -> Backend:
    """The backend the user chose ($HARPOON_VMM, else harpoon's config file), else the
    platform's default: QEMU, on macOS too, for its templates (harpoon.vmm.choice says
    why). BackendChoiceError (a ValueError) names a choice that cannot be followed."""
    from harpoon.vmm import choice

    chosen = choice.choose(BACKEND_NAMES)
    if chosen.name == VfkitBackend.name:
        return VfkitBackend(chosen.vfkit)
    return backend_named(chosen.name)
