"""The interface every VMM backend implements, and the description of a VM to boot.

A backend must expose the guest agent as a unix socket on the host (QEMU's
virtio-serial chardev, vfkit's vsock-over-unix-socket): that is the common ground
between Linux and macOS, so the shim never learns which VMM it runs on. The one
difference the host sees is when it may connect (`agent_waits_for_guest`).

A backend that can save a running guest and start another from the saved state (QEMU
migration to a file; Virtualization.framework's saveMachineStateToURL on macOS 14+)
says so with `Backend.template_identity(config)` (harpoon.vmm.backend);
harpoon.sandbox.template builds VM templates on it.
"""

from __future__ import annotations

import abc
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harpoon.api.names import AGENT_PORT_NAME, STDIO_PORT_NAME
from harpoon.vmm.devices import NIC, Device, Disk, Share, Vsock, check_unique, layout
from harpoon.vmm.leftovers import PID_FILE_NAME

__all__ = [
    "AGENT_PORT_NAME",
    "NIC",
    "STDIO_PORT_NAME",
    "Disk",
    "SavedStateUnsupported",
    "Share",
    "VMConfig",
    "VMError",
    "VirtualMachine",
    "Vsock",
]


# The nice value of a VM with `low_priority` (and of a process building a template).
LOWEST_PRIORITY_NICE = 19


class VMError(Exception):
    """A VM could not be started, or died; the message carries the console's tail."""


class SavedStateUnsupported(VMError):
    """This backend (or this host) cannot save a guest or start one from a saved state."""


@dataclass(frozen=True)
class VMConfig:
    """Everything a backend needs to boot one guest: its size, its guest image and its
    devices (harpoon.vmm.devices), with nothing backend-specific."""

    name: str
    arch: str
    kernel: Path
    initrd: Path
    state_dir: Path
    """Private directory for the VM's sockets, pid file and console log; removed by the caller."""
    cpus: int = 1
    memory_mib: int = 256
    shares: tuple[Share, ...] = ()
    disks: tuple[Disk, ...] = ()
    nics: tuple[NIC, ...] = ()
    vsock: Vsock | None = None
    kernel_args: tuple[str, ...] = ()
    machine: str | None = None
    """The backend's machine type, when not its default for the architecture."""
    low_priority: bool = False
    """Run the VMM at the lowest CPU priority (background work: building a template)."""
    netns: Path | None = None
    """The network namespace the VMM runs in (a file pinning it: /run/netns/*, or
    /proc/<pid>/ns/net), where its tap NICs are; None: the caller's. A host path, so it
    is no part of the layout: a template built in one namespace restores in another."""
    memory_file: Path | None = None
    """Guest RAM backed by this file. A VM started with `start()` maps it shared: its RAM
    lives in the file, so `save_state()` leaves memory out of the saved state. A VM started
    with `restore()` maps it privately (copy on write): the file is never written, and
    pages the guest does not touch are never copied."""

    def __post_init__(self) -> None:
        check_unique(self.devices)

    @property
    def devices(self) -> tuple[Device, ...]:
        return (*self.shares, *self.disks, *self.nics, *((self.vsock,) if self.vsock else ()))

    def layout(self) -> dict[str, Any]:
        """What a saved guest of this VM depends on, apart from the backend and its files:
        size, kernel arguments, machine and the devices' layout; never a host path that
        may differ at restore (see harpoon.vmm.devices)."""
        return {
            "arch": self.arch,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "kernel_args": list(self.kernel_args),
            "machine": self.machine,
            "devices": [layout(device) for device in self.devices],
        }

    def neutral(self) -> VMConfig:
        """This VM with every per-instance value replaced by a fixed placeholder: two VMs
        of one layout give the same neutral config (a backend's template identity)."""
        return replace(
            self,
            name="template",
            state_dir=Path("/state"),
            shares=tuple(share.neutral(i) for i, share in enumerate(self.shares)),
            disks=tuple(disk.neutral(i) for i, disk in enumerate(self.disks)),
            nics=tuple(nic.neutral(i) for i, nic in enumerate(self.nics)),
            vsock=None if self.vsock is None else self.vsock.neutral(0),
            low_priority=False,
            netns=None,
            memory_file=None if self.memory_file is None else Path("/memory"),
        )

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def stdio_socket(self) -> Path:
        return self.state_dir / "stdio.sock"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE_NAME

    @property
    def control_socket(self) -> Path:
        """The VMM's own control channel (QEMU's QMP), for pausing, saving and restoring."""
        return self.state_dir / "vmm.sock"


def describe_exit(status: int | None) -> str:
    """A VMM process's exit status in words, for errors that name how a VM ended."""
    if status is None:
        return "is still running"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class VirtualMachine(abc.ABC):
    """One running guest. Its process must die with the shim that started it."""

    def __init__(self, config: VMConfig) -> None:
        self.config = config

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """The host pid of the VMM process (what containerd reports for the task)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Launches the VMM; returns once the agent socket exists (not when the guest is up)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stops the VMM process and waits for it; safe to call twice or after it died."""

    async def kill(self) -> None:
        """Stops the VMM at once, for a guest with nothing left to save; like stop()
        (idempotent, waits for the process), only without a grace period."""
        await self.stop()

    @abc.abstractmethod
    async def wait(self) -> int:
        """Waits for the VMM process to exit and returns its exit status."""

    @property
    def exit_status(self) -> int | None:
        """The VMM process's exit status once it has exited (negative: the signal that
        killed it); None while it runs or before it started."""
        return None

    @property
    def emulated(self) -> bool:
        """True once started if the guest's code is translated by the VMM (QEMU's TCG)
        rather than run by the CPU (KVM, HVF, Virtualization.framework)."""
        return False

    @property
    def agent_waits_for_guest(self) -> bool:
        """True when a connection to the agent's sockets made once start() returns waits
        there for the guest (QEMU's virtio-serial ports: what the host sends waits in the
        port until the agent reads it), so the host connects once and sends Hello at
        once. False when the VMM closes a connection made before the guest's agent
        listens (vfkit's vsock sockets: EOF), so the host connects again until the agent
        answers, and connects the stdio socket after (harpoon.sandbox.agent_client)."""
        return True

    # -- saved states (VM templates) ---------------------------------------------------
    # The protocol: a template VM is started cold with a host connected to its agent
    # socket (and kept connected), `wait_for_agent_channel()`, then `save_state()`. A
    # later VM with the same identity (host paths may differ) is started with
    # `restore(state)`, its agent socket connected (the guest was saved with a host
    # attached, so it must never see the host go away), then `resume()`.

    async def wait_for_agent_channel(self, timeout_s: float) -> None:
        """Returns once the guest agent has opened its end of the agent channel."""
        raise SavedStateUnsupported(f"{type(self).__name__} cannot watch the agent channel")

    async def save_state(self, path: Path) -> None:
        """Pauses the guest and writes its whole state to `path` (but for its RAM when that
        is `config.memory_file`); the VM stays paused."""
        raise SavedStateUnsupported(f"{type(self).__name__} cannot save a guest")

    async def restore(self, state: Path) -> None:
        """Launches the VMM to continue the guest saved in `state` (with its RAM in
        `config.memory_file` when it was saved that way) instead of booting; returns once
        the agent socket exists, with the guest not yet running (see `resume`)."""
        raise SavedStateUnsupported(f"{type(self).__name__} cannot restore a guest")

    async def resume(self) -> None:
        """Loads the state `restore` was given and lets the guest run from it; may return
        before the load ends (the guest then runs once it is loaded)."""
        raise SavedStateUnsupported(f"{type(self).__name__} cannot restore a guest")

    async def freeze(self) -> None:
        """Stops the guest's vCPUs (the whole container pauses); its memory stays."""
        raise VMError(f"{type(self).__name__} cannot pause a guest")

    async def thaw(self) -> None:
        """Lets a frozen guest run again."""
        raise VMError(f"{type(self).__name__} cannot unpause a guest")

    def console_tail(self, max_bytes: int = 4000) -> str:
        """The end of the guest console, for error messages."""
        try:
            with open(self.config.console_log, "rb") as log:
                log.seek(0, 2)
                size = log.tell()
                log.seek(max(0, size - max_bytes))
                return log.read().decode(errors="replace")
        except OSError:
            return ""
