"""A sandbox: one VM started for one container, and the connection to its agent.

A VM starts by restoring a VM template (harpoon.sandbox.template) when one matches its
configuration, and boots cold otherwise. Readiness is the agent answering Hello either
way: the request is written as soon as QEMU listens and waits in the channel until the
guest opens its end, so there is no polling. A restore that fails or does not answer
within RESTORE_HELLO_TIMEOUT_S discards the template and falls back to a cold boot. A
cold-booted guest that does not answer within BOOT_TIMEOUT_S is killed and booted once
more (about one TCG boot in 35 hangs silently on our machines), then reported with the
end of its console. After a cold boot, once the container's process runs, the sandbox
builds the missing template in the background at the lowest CPU priority; stopping the
sandbox cancels that build, leaving no VM or file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from harpoon.api.agent.v1 import agent_pb2
from harpoon.sandbox import template
from harpoon.sandbox.agent_client import AgentClient
from harpoon.sandbox.template import Template, TemplateStore
from harpoon.ttrpc.status import TtrpcError
from harpoon.vmm.base import VirtualMachine, VMConfig, VMError

BOOT_TIMEOUT_S = 60.0
BOOT_ATTEMPTS = 2
START_ERRORS = (VMError, TtrpcError, OSError, TimeoutError)

log = logging.getLogger(__name__)


class Sandbox:
    def __init__(
        self,
        config: VMConfig,
        make_vm: Callable[[VMConfig], VirtualMachine],
        templates: TemplateStore | Literal[False] | None = None,
    ) -> None:
        """templates: where VM templates live; None for the store the environment names
        (harpoon.sandbox.template.TemplateStore.from_environment), False to boot cold."""
        self.config = config
        self._make_vm = make_vm
        self._templates = TemplateStore.from_environment() if templates is None else templates
        self._template_build: asyncio.Task[None] | None = None
        self.vm: VirtualMachine | None = None
        self.agent: AgentClient | None = None
        self.hello: agent_pb2.HelloResponse | None = None
        self.boot_seconds = 0.0
        self.restored = False
        """True when the VM was restored from a template rather than booted."""

    @property
    def pid(self) -> int:
        return self.vm.pid if self.vm else 0

    async def start(self) -> None:
        found = self._find_template()
        if found is not None:
            store, existing = found
            if existing is not None and await self._restore(store, existing):
                return
        last_error: Exception | None = None
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                await self._boot()
                break
            except START_ERRORS as error:
                last_error = error
                log.warning("boot attempt %d of %s failed: %s", attempt, self.config.name, error)
                await self.stop()
        else:
            raise VMError(f"VM {self.config.name} did not start: {last_error}")
        if found is not None:
            self._template_build = asyncio.ensure_future(self._build_template_when_running())

    def _find_template(self) -> tuple[TemplateStore, Template | None] | None:
        """The store to use and its template for this VM, if the backend can restore."""
        if not self._templates:
            return None
        identity = self._make_vm(self.config).template_identity()
        if identity is None:
            return None
        return self._templates, self._templates.find(template.template_key(identity))

    async def _restore(self, store: TemplateStore, found: Template) -> bool:
        began = time.monotonic()
        try:
            self.vm, self.agent, self.hello = await template.restore(
                self._make_vm, self.config, found.state
            )
        except START_ERRORS as error:
            log.warning(
                "restoring %s from template %s failed, booting cold and rebuilding it: %s",
                self.config.name, found.key, error,
            )  # fmt: skip
            store.discard(found)
            return False
        self.boot_seconds = time.monotonic() - began
        self.restored = True
        store.mark_used(found)
        log.info("restored %s from template %s in %.2f s", self.config.name, found.key,
                 self.boot_seconds)  # fmt: skip
        return True

    async def _build_template_when_running(self) -> None:
        """Builds this VM's missing template once the container runs, so it takes nothing
        from the container's start; gives up if another process is building it."""
        agent, store = self.agent, self._templates
        assert agent is not None and store
        await agent.process_started.wait()
        try:
            await store.build(
                replace(self.config, low_priority=True), self._make_vm, wait_for_lock=False
            )
        except (*START_ERRORS, ValueError) as error:
            log.warning("building a VM template for %s failed: %s", self.config.name, error)

    async def _boot(self) -> None:
        began = time.monotonic()
        vm = self._make_vm(self.config)
        self.vm = vm
        await vm.start()
        self.agent = await AgentClient.connect(
            str(self.config.agent_socket), str(self.config.stdio_socket)
        )
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
        """Tears the VM down (and any template build it started); idempotent."""
        building, self._template_build = self._template_build, None
        if building is not None:
            building.cancel()
            await asyncio.wait({building})
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()
            self.agent = None
        if self.vm is not None:
            await self.vm.stop()
