"""The interface every VMM backend implements, and the description of a VM to boot.

A backend must expose the guest agent as a unix socket on the host (QEMU's
virtio-serial chardev, vfkit's vsock-over-unix-socket): that is the common ground
between Linux and macOS, so the shim never learns which VMM it runs on.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from harpoon.api.names import AGENT_PORT_NAME

__all__ = ["AGENT_PORT_NAME", "Share", "VMConfig", "VMError", "VirtualMachine"]


class VMError(Exception):
    """A VM could not be started, or died; the message carries the console's tail."""


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts by tag (9p here, virtiofs where available)."""

    tag: str
    host_path: Path
    read_only: bool = False


@dataclass(frozen=True)
class VMConfig:
    """Everything a backend needs to boot one guest."""

    name: str
    arch: str
    kernel: Path
    initrd: Path
    state_dir: Path
    """Private directory for the VM's sockets, pid file and console log; removed by the caller."""
    cpus: int = 1
    memory_mib: int = 256
    shares: tuple[Share, ...] = ()
    kernel_args: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "vmm.pid"


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

    @abc.abstractmethod
    async def wait(self) -> int:
        """Waits for the VMM process to exit and returns its exit status."""

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
