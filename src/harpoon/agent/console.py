"""The agent's messages to the guest console (its stderr), which the host keeps in the
VM's console log and quotes when a guest fails."""

from __future__ import annotations

import contextlib
import sys


def log(message: str) -> None:
    # A console that cannot be written must not take PID 1 down with it.
    with contextlib.suppress(OSError):
        print(f"harpoon-agent: {message}", file=sys.stderr, flush=True)
