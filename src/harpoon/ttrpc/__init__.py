"""ttrpc, containerd's lightweight RPC protocol, over asyncio streams.

Layers, bottom up: ``codec`` (frames, sans-IO), ``protocol`` (per-connection stream
rules, sans-IO), ``channel`` (shared asyncio plumbing), ``server`` and ``client``
(payload-level calls), ``service`` (protobuf-typed services). This package must never
import anything beyond the standard library and protobuf: the guest agent runs it too.
"""

from harpoon.ttrpc.client import Client
from harpoon.ttrpc.codec import HEADER_BYTES, MAX_MESSAGE_BYTES, Flags, Frame, MessageType
from harpoon.ttrpc.server import CallContext, Server
from harpoon.ttrpc.service import ServiceClient, register_service
from harpoon.ttrpc.status import Code, ConnectionClosedError, TtrpcError

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
