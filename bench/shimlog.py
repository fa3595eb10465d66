"""What harpoon's shims logged: each VM's start time and whether it was restored.

containerd copies each shim's log FIFO into its own log (at debug level), so the shim's
`created ID: VM pid N started in X s (…)` (launch → agent ready, a cold boot or a
template restore; `booted in X s` before 7f2ca71), `restored ID from template K in
X s` and, for a VM planned to boot cold, `ID: WHY: booting cold` lines (harpoon.sandbox.plan;
none when templates are off) are in our throw-away daemon's log, and so is `boot attempt
N of ID failed: …` for a cold boot the sandbox gave up on and booted again
(harpoon.sandbox.sandbox: a guest silent for BOOT_TIMEOUT_S). The time in `created` is
the last attempt's alone. Read-only; the log is read incrementally.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

#: How long to wait for a shim's line to reach containerd's log.
LINE_WAIT_S = 5.0
POLL_S = 0.05

#: "booted in" before 7f2ca71, "started in … (restored|cold boot)" since: a baseline
#: commit (`--baseline-commit`) may log either.
_CREATED = re.compile(r"created (\S+): VM pid \d+ (?:booted|started) in ([0-9.]+) s")
_RESTORED = re.compile(r"restored (\S+) from template")
#: The plan's reason (`msg=ID: WHY: booting cold`; `=` and `"` end the ID, as containerd
#: may quote the shim's line).
_COLD = re.compile(r'([\w.-]+): ([^"\n]+?): booting cold')
#: Its reason ends at "; console:" (the console's tail follows on the next lines).
_FAILED_BOOT = re.compile(r"boot attempt \d+ of (\S+) failed: (.*?)(?:; console:|$)", re.MULTILINE)


@dataclass(frozen=True)
class VMStart:
    """launch → agent ready of one container's VM, and how: "template" or "cold"."""

    seconds: float | None
    mode: str | None
    #: Why the plan booted it cold, when it said (harpoon.sandbox.plan).
    cold_reason: str | None = None
    #: Why each cold boot given up on before the one that answered was (their time is
    #: not in `seconds`, only in the run's wall time).
    failed_boots: tuple[str, ...] = ()


class ShimLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._created: dict[str, float] = {}
        self._restored: set[str] = set()
        self._cold_reasons: dict[str, str] = {}
        self._failed_boots: dict[str, tuple[str, ...]] = {}

    def _scan(self) -> None:
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except OSError:
            return
        # Only whole lines: a line being written is read again next time.
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        text = complete.decode(errors="replace")
        for match in _CREATED.finditer(text):
            self._created[match.group(1)] = float(match.group(2))
        self._restored.update(m.group(1) for m in _RESTORED.finditer(text))
        self._cold_reasons.update((m[1], m[2]) for m in _COLD.finditer(text))
        for match in _FAILED_BOOT.finditer(text):
            self._failed_boots[match[1]] = (*self._failed_boots.get(match[1], ()), match[2])

    async def start(self, container_id: str) -> VMStart:
        """How the VM of `container_id` started (waits briefly for the log line)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINE_WAIT_S
        self._scan()
        while container_id not in self._created and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
            self._scan()
        seconds = self._created.get(container_id)
        failed = self._failed_boots.get(container_id, ())
        if seconds is None:
            return VMStart(None, None, failed_boots=failed)
        if container_id in self._restored:
            return VMStart(seconds, "template", failed_boots=failed)
        return VMStart(seconds, "cold", self._cold_reasons.get(container_id), failed)
