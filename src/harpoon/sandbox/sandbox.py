"""A sandbox: one VM booted for one container, and the connection to its agent.

Boot readiness is the agent answering Hello: the request is written as soon as QEMU
listens and waits in the channel until the guest opens its end, so there is no
polling. A guest that does not answer within BOOT_TIMEOUT_S is killed and booted once
more (about one TCG boot in 35 hangs silently on our machines), then reported with
the end of its console.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from harpoon.api.agent.v1 import agent_pb2
from harpoon.sandbox.agent_client import AgentClient
from harpoon.ttrpc.status import TtrpcError
from harpoon.vmm.base import VirtualMachine, VMConfig, VMError

BOOT_TIMEOUT_S = 60.0
BOOT_ATTEMPTS = 2

log = logging.getLogger(__name__)


class Sandbox:
    def __init__(self, config: VMConfig, make_vm: Callable[[VMConfig], VirtualMachine]) -> None:
        self.config = config
        self._make_vm = make_vm
        self.vm: VirtualMachine | None = None
        self.agent: AgentClient | None = None
        self.hello: agent_pb2.HelloResponse | None = None
        self.boot_seconds = 0.0

    @property
    def pid(self) -> int:
        return self.vm.pid if self.vm else 0

    async def start(self) -> None:
        last_error: Exception | None = None
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                await self._boot()
                return
            except (VMError, TtrpcError, OSError, TimeoutError) as error:
                last_error = error
                log.warning("boot attempt %d of %s failed: %s", attempt, self.config.name, error)
                await self.stop()
        raise VMError(f"VM {self.config.name} did not start: {last_error}")

    async def _boot(self) -> None:
        began = time.monotonic()
        vm = self._make_vm(self.config)
        self.vm = vm
        await vm.start()
        self.agent = await AgentClient.connect(str(self.config.agent_socket))
        hello = asyncio.ensure_future(self.agent.hello(timeout=BOOT_TIMEOUT_S))
        died = asyncio.ensure_future(vm.wait())
        done, _ = await asyncio.wait(
            {hello, died}, timeout=BOOT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if hello in done and hello.exception() is None:
            died.cancel()
        else:
            if hello not in done:
                hello.cancel()
                reason = f"no answer from the agent within {BOOT_TIMEOUT_S:.0f} s"
            else:
                reason = f"the agent connection failed ({hello.exception()})"
                # The channel closes as the VMM exits: give it a moment to say how.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(died), 2.0)
            if died.done():
                reason += f"; the VMM exited with status {died.result()}"
            died.cancel()
            raise VMError(f"{reason}; console:\n{vm.console_tail()}")
        self.hello = hello.result()
        self.boot_seconds = time.monotonic() - began

    async def stop(self) -> None:
        """Tears the VM down; idempotent."""
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()
            self.agent = None
        if self.vm is not None:
            await self.vm.stop()
