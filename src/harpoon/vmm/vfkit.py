"""The vfkit backend: a vfkit process's lifetime, once launched (its command line and
its launch are harpoon.vmm.vfkit_launch's; its REST API harpoon.vmm.vfkit_api's).

vfkit cannot save or restore a guest (vfkit issue #449: Virtualization.framework can,
vfkit does not expose it), so there are no VM templates through it: every container's
VM boots cold, the whole kernel and agent start-up on its critical path (QEMU with
templates restores a saved guest instead). That is the price of this backend, and why
it is not the default on macOS (harpoon.vmm.backend); what it costs in start time is
measured by bench/vmm.py, its figures in bench/README.md, "vfkit: no save/restore".

start() returns once vfkit listens on the agent's socket, which it does once the VM
runs (cmd/vfkit/main.go: after VZ reports Running); a connection made before the
guest's agent listens is closed by vfkit, so the host connects again until the agent
answers (`agent_waits_for_guest` is False: harpoon.sandbox). stop() asks vfkit for a
HardStop (the VM ends, vfkit exits cleanly, its sockets removed) and kills it if it
has not exited within STOP_GRACE_S; kill() kills it at once. freeze() and thaw() are
VZ's pause and resume, through the REST API.

`emulated`: vfkit itself runs guests on the CPU (Virtualization.framework). It exists
only on macOS; the `vfkit` harpoon runs anywhere else is its test double
(harpoon.devenv.vfkit_double), which runs the guest in QEMU, under TCG on harpoon's
Linux machines: there the VM says it is emulated, so that the agent warms up as under
QEMU's TCG (harpoon.agent.warm_up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from harpoon.vmm.base import VirtualMachine, VMConfig, VMError, describe_exit
from harpoon.vmm.process import VmmProcess
from harpoon.vmm.vfkit_api import VfkitApi, VfkitApiError
from harpoon.vmm.vfkit_launch import (
    IS_MACOS,
    Prelaunched,
    VfkitLaunch,
    end_helpers,
    launch,
    rest_socket,
)

log = logging.getLogger(__name__)

#: vfkit makes the agent's socket once VZ says the VM runs (vfkit itself gives up after
#: 5 s); the double once its QEMU is up.
START_TIMEOUT_S = 30.0
START_POLL_S = 0.005
#: How long a HardStop may take before vfkit is killed.
STOP_GRACE_S = 2.0
VMM_LOG_TAIL_BYTES = 2000


class VfkitVM(VirtualMachine):
    """A guest running in a vfkit child process of this shim."""

    def __init__(
        self, config: VMConfig, program: str, prelaunched: Prelaunched | None = None
    ) -> None:
        """program: the vfkit to run; prelaunched: a vfkit launched ahead, which this VM
        runs if it asks for that very launch."""
        super().__init__(config)
        self._program = program
        self._prelaunched = prelaunched
        self._launched: VfkitLaunch | None = None
        self._process: VmmProcess | None = None
        self._api = VfkitApi(rest_socket(config))

    @property
    def pid(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return self._process.pid

    @property
    def emulated(self) -> bool:
        return not IS_MACOS  # see the module's docstring

    @property
    def agent_waits_for_guest(self) -> bool:
        return False

    async def start(self) -> None:
        launched = None
        if self._prelaunched is not None:
            launched = await self._prelaunched.take(self.config)
        if launched is None:
            launched = launch(self.config, self._program)
        self._launched, self._process = launched, launched.process
        self.config = launched.resolved
        self._api = VfkitApi(rest_socket(self.config))
        try:
            await self._wait_for_agent_socket()
        except BaseException:
            await self.kill()
            raise

    async def _wait_for_agent_socket(self) -> None:
        """Returns once vfkit's agent socket exists (vfkit binds it and listens at once:
        a connection in between is refused, and the host's connect retries that)."""
        assert self._process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not self.config.agent_socket.exists():
            status = self._process.returncode
            if status is not None:
                raise VMError(
                    f"VM {self.config.name}: vfkit {describe_exit(status)} before the VM ran; "
                    f"vfkit said: {self._vmm_log()}"
                )
            if loop.time() > deadline:
                raise VMError(
                    f"VM {self.config.name}: vfkit made no agent socket within "
                    f"{START_TIMEOUT_S:.0f} s; vfkit said: {self._vmm_log()}"
                )
            await asyncio.sleep(START_POLL_S)

    def _vmm_log(self) -> str:
        try:
            text = (self.config.state_dir / "vmm.log").read_text(errors="replace")
        except OSError:
            return ""
        return text[-VMM_LOG_TAIL_BYTES:].strip() or "(nothing)"

    async def stop(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await self._api.change("HardStop")
            except VfkitApiError as error:  # not up yet, or going: a signal says it too
                log.debug("VM %s: %s; sending SIGTERM", self.config.name, error)
                process.terminate()
        await self._end(STOP_GRACE_S)

    async def kill(self) -> None:
        await self._end(0.0)

    async def _end(self, grace_s: float) -> None:
        """Waits up to grace_s for vfkit to exit, then kills it; ends its helpers."""
        process = self._process
        try:
            if process is not None and process.returncode is None:
                if grace_s > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(process.wait(), grace_s)
                process.kill()
                await process.wait()
        finally:
            if self._launched is not None:
                await end_helpers(self._launched)
            # What a killed vfkit leaves (its Go listeners remove their files as it
            # exits cleanly): the next VM of this state directory listens there.
            for path in (
                self.config.agent_socket,
                self.config.stdio_socket,
                rest_socket(self.config),
            ):
                path.unlink(missing_ok=True)

    async def wait(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return await self._process.wait()

    @property
    def exit_status(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def freeze(self) -> None:
        await self._api.change("Pause")

    async def thaw(self) -> None:
        await self._api.change("Resume")
