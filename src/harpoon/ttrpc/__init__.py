"""ttrpc, containerd's lightweight RPC protocol, over asyncio streams.

Layers, bottom up: ``codec`` (frames, sans-IO), ``protocol`` (per-connection stream
rules, sans-IO), ``channel`` (shared asyncio plumbing), ``server`` and ``client``
(payload-level calls), ``service`` (protobuf-typed services). This package must never
import anything beyond the standard library and protobuf: the guest agent runs it too.

The names below are loaded on first use, not when the package is imported: importing
one submodule (``harpoon.ttrpc.status``, say) must not drag in the others, because the
guest agent pays for every module it loads (it never needs the client side).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harpoon.ttrpc.client import Client
    from harpoon.ttrpc.codec import HEADER_BYTES, MAX_MESSAGE_BYTES, Flags, Frame, MessageType
    from harpoon.ttrpc.server import CallContext, Server
    from harpoon.ttrpc.service import ServiceClient, register_service
    from harpoon.ttrpc.status import Code, ConnectionClosedError, TtrpcError

_SUBMODULE_OF = {
    "Client": "client",
    "HEADER_BYTES": "codec",
    "MAX_MESSAGE_BYTES": "codec",
    "Flags": "codec",
    "Frame": "codec",
    "MessageType": "codec",
    "CallContext": "server",
    "Server": "server",
    "ServiceClient": "service",
    "register_service": "service",
    "Code": "status",
    "ConnectionClosedError": "status",
    "TtrpcError": "status",
}

__all__ = [
    "HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "CallContext",
    "Client",
    "Code",
    "ConnectionClosedError",
    "Flags",
    "Frame",
    "MessageType",
    "Server",
    "ServiceClient",
    "TtrpcError",
    "register_service",
]


def __getattr__(name: str) -> Any:
    submodule = _SUBMODULE_OF.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
