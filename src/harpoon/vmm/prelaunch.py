"""A VMM launched ahead of the VM that will run it, whatever the backend.

A shim launches its VM before it has loaded what drives one (harpoon.shim.daemon). The
first VM to start through the holder takes the launch if it asks for exactly what was
launched; any other start ends it, as does `discard`: a launch is never left running
unowned. Each backend's launch module says what "exactly" means (QEMU: the config and
the saved state it restores; vfkit: the config) and how a launch is ended.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from harpoon.vmm.base import VMConfig

log = logging.getLogger(__name__)


class Launch(Protocol):
    @property
    def config(self) -> VMConfig: ...


L = TypeVar("L", bound=Launch)


class Prelaunched(Generic[L]):
    def __init__(self, launched: L, end: Callable[[L], Awaitable[None]], vmm: str) -> None:
        self._launched: L | None = launched
        self._end = end
        self._vmm = vmm

    async def take_if(self, fits: Callable[[L], bool]) -> L | None:
        """The launch if `fits` says it is the one asked for; else it is ended."""
        launched, self._launched = self._launched, None
        if launched is None:
            return None
        if fits(launched):
            return launched
        log.info("the %s launched ahead for %s does not fit its VM: stopping it",
                 self._vmm, launched.config.name)  # fmt: skip
        await self._end(launched)
        return None

    async def discard(self) -> None:
        """Ends the launch unless it was taken; idempotent."""
        launched, self._launched = self._launched, None
        if launched is not None:
            await self._end(launched)
