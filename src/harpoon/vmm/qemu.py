"""The QEMU backend: a QEMU process's lifetime, once launched (its command line and
its launch are harpoon.vmm.qemu_launch's).

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

What QEMU reports by QMP event is waited for by event, never polled: the guest opening
a virtio-serial port (VSERPORT_CHANGE, sent for ports whose device has an id) and the
migration's progress (MIGRATION, once the `events` capability is on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from harpoon.vmm.base import VirtualMachine, VMConfig, VMError
from harpoon.vmm.process import VmmProcess
from harpoon.vmm.qemu_launch import (
    AGENT_DEVICE_ID,
    STDIO_DEVICE_ID,
    Prelaunched,
    QemuLaunch,
    end_helpers,
    launch,
)
from harpoon.vmm.qmp import EventListener, QmpClient, QmpError

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0
MIGRATION_TIMEOUT_S = 60.0
# QEMU's default migration bandwidth (~128 MiB/s) makes saving a guest 10x slower.
MIGRATION_MAX_BANDWIDTH_BYTES_S = 10_000_000_000
MIGRATION_FAILED = frozenset({"failed", "cancelled"})
# The guest's ports a template waits for, by chardev label: the device id QEMU names
# in their VSERPORT_CHANGE events.
PORT_DEVICE_IDS = {"agent": AGENT_DEVICE_ID, "stdio": STDIO_DEVICE_ID}


IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}
MIGRATION_EVENTS = {"capability": "events", "state": True}


class QemuVM(VirtualMachine):
    """A guest running in a QEMU child process of this shim."""

    def __init__(self, config: VMConfig, prelaunched: Prelaunched | None = None) -> None:
        """prelaunched: a QEMU launched ahead (harpoon.vmm.qemu_launch.Prelaunched),
        which this VM runs if it asks for that very launch."""
        super().__init__(config)
        self._prelaunched = prelaunched
        self._process: VmmProcess | None = None
        self._launched: QemuLaunch | None = None
        self._qmp_client: QmpClient | None = None
        self._incoming: str | None = None  # migrate-incoming's URI, when restoring
        self._emulated = False

    @property
    def emulated(self) -> bool:
        return self._emulated

    @property
    def pid(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return self._process.pid

    async def start(self) -> None:
        await self._launch(None)

    async def _launch(self, restoring: Path | None) -> None:
        launched = None
        if self._prelaunched is not None:
            launched = await self._prelaunched.take(self.config, restoring)
        if launched is None:
            launched = launch(self.config, restoring)
        self.config, self._process = launched.resolved, launched.process
        self._launched = launched
        self._emulated = launched.emulated
        self._incoming = launched.incoming
        # Its sockets listen already (the launcher bound them; QEMU inherited them).

    def _vmm_log(self) -> str:
        try:
            return (self.config.state_dir / "vmm.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def _qmp(self) -> QmpClient:
        if self._qmp_client is None:
            # Listening since the launch: refused only once QEMU is gone.
            try:
                self._qmp_client = await QmpClient.connect(str(self.config.control_socket))
            except OSError as error:
                raise VMError(
                    f"VM {self.config.name}: no QMP ({error}); QEMU said: {self._vmm_log()}"
                ) from None
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

    @contextlib.asynccontextmanager
    async def _listening(self, *events: str) -> AsyncIterator[EventListener]:
        """The QMP events of these names from now on; failures named as _execute's."""
        try:
            with (await self._qmp()).listen(*events) as listener:
                yield listener
        except TimeoutError:
            raise  # the caller's own deadline, not the connection's failure
        except (QmpError, OSError) as error:
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
        try:
            await self._end_qemu(grace_s)
        finally:
            if self._launched is not None:
                await end_helpers(self._launched)

    async def _end_qemu(self, grace_s: float) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        if grace_s > 0:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), grace_s)
                return
        process.kill()
        await process.wait()

    @property
    def exit_status(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def wait(self) -> int:
        if self._process is None:
            raise VMError(f"VM {self.config.name} has not been started")
        return await self._process.wait()

    # -- saved states ------------------------------------------------------------------

    async def wait_for_agent_channel(self, timeout_s: float) -> None:
        # The port's chardev "frontend" is open exactly while the guest holds the port
        # open (virtio-console.c: set_guest_connected, which also sends VSERPORT_CHANGE);
        # the guest agent opens it once its service is registered, so this is "agent
        # ready" without a request. Both ports: a guest saved before it opened one
        # would never see its host.
        async with asyncio.timeout(timeout_s):
            async with self._listening("VSERPORT_CHANGE") as changes:
                # Once, in case a port opened before the listener was there.
                chardevs = await self._execute("query-chardev")
                closed = set(PORT_DEVICE_IDS) - {
                    chardev.get("label") for chardev in chardevs if chardev.get("frontend-open")
                }
                labels = {id: label for label, id in PORT_DEVICE_IDS.items()}
                while closed:
                    change = await changes.get()
                    label = labels.get(str(change.data.get("id")))
                    if label is not None:
                        if change.data.get("open"):
                            closed.discard(label)
                        else:
                            closed.add(label)

    async def save_state(self, path: Path) -> None:
        # Migrated running (QEMU stops the guest as the migration completes), so the
        # saved run state is "running" and a restored guest starts by itself once
        # loaded: no `cont`, no waiting for the load to end (see resume()).
        capabilities = [MIGRATION_EVENTS]
        if self._ignores_shared():
            capabilities.append(IGNORE_SHARED)
        async with self._listening("MIGRATION") as migration:
            await self._execute_all(
                [
                    ("migrate-set-capabilities", {"capabilities": capabilities}),
                    ("migrate-set-parameters", {"max-bandwidth": MIGRATION_MAX_BANDWIDTH_BYTES_S}),
                    ("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"}),
                ]
            )
            async with asyncio.timeout(MIGRATION_TIMEOUT_S):
                # Once, in case the migration ended before the listener saw it start.
                status = str((await self._execute("query-migrate")).get("status", ""))
                while status != "completed":
                    if status in MIGRATION_FAILED:
                        answer = await self._execute("query-migrate")
                        raise VMError(
                            f"VM {self.config.name}: migration {status}: "
                            f"{answer.get('error-desc', '')}; QEMU said: {self._vmm_log()}"
                        )
                    status = str((await migration.get()).data.get("status", ""))

    def _ignores_shared(self) -> bool:
        return self.config.memory_file is not None

    async def restore(self, state: Path) -> None:
        if not state.is_file():
            raise VMError(f"no saved guest state at {state}")
        memory = self.config.memory_file
        if memory is not None and not memory.is_file():
            # QEMU would create it: a guest of zeros.
            raise VMError(f"no saved guest memory at {memory}")
        await self._launch(state)

    async def resume(self) -> None:
        if self._incoming is None:
            raise VMError(f"VM {self.config.name} was not started with restore()")
        commands: list[tuple[str, dict[str, Any] | None]] = []
        if self._ignores_shared():
            commands.append(("migrate-set-capabilities", {"capabilities": [IGNORE_SHARED]}))
        commands.append(("migrate-incoming", {"uri": self._incoming}))
        # The guest was saved running: it runs as soon as it is loaded. A state QEMU
        # cannot load makes it exit, which closes the agent's connection.
        await self._execute_all(commands)

    async def freeze(self) -> None:
        await self._execute("stop")

    async def thaw(self) -> None:
        await self._execute("cont")
