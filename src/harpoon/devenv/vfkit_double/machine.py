"""The VM: a QEMU process driven over QMP, in the states VZ would report.

VZ's state machine mapped onto QEMU (states named in harpoon.devenv.vfkit_double.states):
- Stopped until QEMU is launched (paused at start), Starting until QMP's `cont` has
  returned, then Running (vfkit waits up to 5 s for Running: cmd/vfkit/main.go);
- Pause = QMP `stop` (Pausing, then Paused); Resume = `cont` (Resuming, then Running);
- Stop (vfkit's RequestStop: ask the guest) = `system_powerdown`; the state stays
  Running until the guest powers off;
- HardStop (vfkit's Stop) = `quit`, or SIGKILL when QMP cannot be reached (Stopping);
- QEMU's SHUTDOWN event (the guest powered off or reset: -no-reboot) is Stopping; its
  exit is Stopped, or Error when it exited with a failure nobody asked for (vfkit then
  exits 1: "virtualization error").
One change at a time, as VZ serialises them on its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from pathlib import Path
from typing import Any

from harpoon import aio
from harpoon.devenv.vfkit_double import devices
from harpoon.devenv.vfkit_double.cmdline import Options
from harpoon.devenv.vfkit_double.states import (
    ChangeRefused,
    Requested,
    StateChange,
    VMState,
    check_change,
)
from harpoon.vmm.qmp import QmpClient, QmpError

log = logging.getLogger("vfkit")

#: vfkit's wait for Running after vm.Start() (cmd/vfkit/main.go runVirtualMachine).
START_TIMEOUT_S = 5.0
QMP_TIMEOUT_S = 10.0


class StartError(RuntimeError):
    """The VM did not reach Running."""


class Machine:
    def __init__(self, options: Options) -> None:
        self.options = options
        self._state = VMState.STOPPED
        self._process: subprocess.Popen[bytes] | None = None
        self._qmp: QmpClient | None = None
        self._lock = asyncio.Lock()
        self._hard_stop_asked = False
        self._exited = asyncio.Event()

    @property
    def state(self) -> VMState:
        return self._state

    def inspect(self) -> dict[str, Any]:
        """vfkit's config JSON (pkg/config/json.go): what /vm/inspect answers."""
        boot = self.options.bootloader
        return {
            "vcpus": self.options.cpus,
            "memoryBytes": self.options.memory_mib * 1024 * 1024,
            "bootloader": {
                "kind": "linuxBootloader",
                "vmlinuzPath": boot.kernel,
                "kernelCmdLine": boot.cmdline,
                "initrdPath": boot.initrd,
            },
            "devices": [devices.inspect_json(device) for device in self.options.devices],
        }

    async def start(self, process: subprocess.Popen[bytes], qmp_socket: Path) -> None:
        """Takes the QEMU launched paused and runs it: Starting, then Running within
        START_TIMEOUT_S of the `cont` (VZ's start() returns before vfkit's wait; QEMU's
        own set-up, up to its QMP greeting, is that start()), or StartError."""
        self._process = process
        self._state = VMState.STARTING
        try:
            self._qmp = await QmpClient.connect(str(qmp_socket), timeout=QMP_TIMEOUT_S)
            await self._qmp.execute("cont", timeout=START_TIMEOUT_S)
        except (QmpError, OSError) as error:
            raise StartError(f"the VM did not start: {error}") from None
        self._state = VMState.RUNNING

    async def run(self) -> VMState:
        """Waits for QEMU's exit (following its SHUTDOWN event); the final state."""
        assert self._process is not None, "start() first"
        async with asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(self._watch_shutdown())
            status = await aio.process_exit(self._process)
            watcher.cancel()
        failed = status != 0 and not self._hard_stop_asked
        self._state = VMState.ERROR if failed else VMState.STOPPED
        self._exited.set()
        if failed:
            log.error("QEMU exited with status %s", status)
        return self._state

    async def _watch_shutdown(self) -> None:
        if self._qmp is None:
            return
        with self._qmp.listen("SHUTDOWN") as events, contextlib.suppress(QmpError):
            event = await events.get()
            log.debug("QEMU shut down: %s", event.data.get("reason", "?"))
            self._state = VMState.STOPPING

    async def wait_stopped(self, timeout_s: float) -> bool:
        """True once QEMU has exited, False if it has not after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._exited.wait()
        except TimeoutError:
            return False
        return True

    async def change(self, requested: Requested) -> None:
        """A REST state change (vfkit pkg/rest/vf/state_change.go); ChangeRefused as VZ
        would refuse it."""
        async with self._lock:
            change = check_change(requested, self._state)
            if change is StateChange.PAUSE:
                await self._move("stop", VMState.PAUSING, VMState.PAUSED)
            elif change is StateChange.RESUME:
                await self._move("cont", VMState.RESUMING, VMState.RUNNING)
            elif change is StateChange.STOP:
                await self._qmp_command("system_powerdown")
            else:
                await self._hard_stop()

    async def request_stop(self) -> None:
        """vfkit's RequestStop from its signal handler: errors are logged, not raised."""
        try:
            await self.change(Requested(StateChange.STOP.value))
        except ChangeRefused as error:
            log.error("failed to shutdown VM: %s", error)

    async def hard_stop(self) -> None:
        """vfkit's forced Stop: whatever the state, QEMU ends."""
        async with self._lock:
            await self._hard_stop()

    async def _hard_stop(self) -> None:
        self._hard_stop_asked = True
        if self._process is None or self._exited.is_set():
            return
        self._state = VMState.STOPPING
        try:
            await self._qmp_command("quit")
        except ChangeRefused as error:
            log.warning("QMP quit failed (%s): killing QEMU", error)
            self._process.kill()

    async def _move(self, command: str, during: VMState, after: VMState) -> None:
        before = self._state
        self._state = during
        try:
            await self._qmp_command(command)
        except ChangeRefused:
            if self._state is during:
                self._state = before
            raise
        if self._state is during:
            self._state = after

    async def _qmp_command(self, command: str) -> None:
        if self._qmp is None:
            raise ChangeRefused(f"the VM is {self._state.value}: QEMU is not under control yet")
        try:
            await self._qmp.execute(command, timeout=QMP_TIMEOUT_S)
        except QmpError as error:
            raise ChangeRefused(str(error)) from None

    async def close(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
