"""Protobuf-typed ttrpc: serve a service's RPCs from plain async methods, call them with
messages.

``register_service`` walks a ServiceDescriptor and binds each RPC to the method of the
same name on an implementation object; ``ServiceClient`` is the calling side. This layer
only converts between messages and payloads: it must never know about frames, streams
ids or connections.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from harpoon.ttrpc.codec import Parts, Payload
from harpoon.ttrpc.server import CallContext, Server
from harpoon.ttrpc.status import Code, TtrpcError

if TYPE_CHECKING:
    # Only the calling side needs the client; the guest agent, a server, never loads it.
    from harpoon.ttrpc.client import Client

M = TypeVar("M", bound=Message)

# An implementation's RPC method, looked up by name; its shape depends on the RPC kind.
_ImplMethod = Callable[..., Any]


_RAW_MESSAGES = "_ttrpc_raw_messages"

F = TypeVar("F", bound=Callable[..., Any])


def raw_messages(method: F) -> F:
    """Marks a client-streaming implementation that takes its requests as they came,
    serialized (bytes, or a view the server keeps unchanged until the next message), and
    decodes them itself: how a stream of large messages (a container's stdin) reaches
    the guest agent without protobuf copying each of them."""
    setattr(method, _RAW_MESSAGES, True)
    return method


def register_service(
    server: Server,
    descriptor: ServiceDescriptor,
    impl: object,
    *,
    names: Sequence[str] | None = None,
) -> None:
    """Serves every RPC of ``descriptor`` from ``impl.<RpcName>``.

    Unary RPCs: ``async def Rpc(self, request, ctx) -> response``. Server-streaming: an
    async generator ``Rpc(self, request, ctx)`` yielding responses, or responses already
    encoded as ``codec.Parts`` (sent as they are: the implementation vouches for them).
    Client-streaming: ``async def Rpc(self, requests: AsyncIterator[request], ctx) ->
    response``, or, marked ``@raw_messages``, requests as their serialized bytes. RPCs
    that ``impl`` lacks answer UNIMPLEMENTED. ``names`` registers the
    same implementation under several service names (e.g. containerd.task.v2.Task and
    .v3.Task, whose messages are the same); by default the descriptor's full name.
    """
    for method in descriptor.methods:
        if method.client_streaming and method.server_streaming:
            raise ValueError(
                f"{descriptor.full_name}.{method.name}: bidirectional streams are not supported"
            )
        found: _ImplMethod | None = getattr(impl, method.name, None)
        for name in names if names is not None else [descriptor.full_name]:
            where = f"{name}.{method.name}"
            bound = found or _unimplemented(f"{where} is not implemented by {type(impl).__name__}")
            _register_method(server, name, method, bound, where)


def _register_method(
    server: Server, name: str, method: MethodDescriptor, impl: _ImplMethod, where: str
) -> None:
    request_type: type[Message] = GetMessageClass(method.input_type)
    response_type: type[Message] = GetMessageClass(method.output_type)

    if method.server_streaming:

        async def server_stream(payload: bytes, ctx: CallContext) -> AsyncIterator[Payload]:
            async for response in impl(_parse(request_type, payload, where), ctx):
                if isinstance(response, Parts):
                    yield response
                else:
                    yield _serialize(response, response_type, where)

        server.register_server_stream(name, method.name, server_stream)
    elif method.client_streaming:
        raw = getattr(impl, _RAW_MESSAGES, False)

        async def client_stream(payloads: AsyncIterator[bytes], ctx: CallContext) -> bytes:
            if raw:
                return _serialize(await impl(payloads, ctx), response_type, where)
            requests = (_parse(request_type, payload, where) async for payload in payloads)
            return _serialize(await impl(requests, ctx), response_type, where)

        server.register_client_stream(name, method.name, client_stream)
    else:

        async def unary(payload: bytes, ctx: CallContext) -> bytes:
            response = await impl(_parse(request_type, payload, where), ctx)
            return _serialize(response, response_type, where)

        server.register_unary(name, method.name, unary)


def _unimplemented(message: str) -> _ImplMethod:
    def refuse(*_: object) -> Any:
        raise TtrpcError(Code.UNIMPLEMENTED, message)

    return refuse


def _parse(message_type: type[M], payload: bytes, where: str) -> M:
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise TtrpcError(
            Code.INTERNAL,
            f"ttrpc: error unmarshalling payload for {where} "
            f"({message_type.DESCRIPTOR.full_name}): {exc}",
        ) from exc
    return message


def _serialize(message: object, message_type: type[Message], where: str) -> bytes:
    if not isinstance(message, message_type):
        raise TtrpcError(
            Code.INTERNAL,
            f"{where} returned {type(message).__name__}, "
            f"expected {message_type.DESCRIPTOR.full_name}",
        )
    return message.SerializeToString()


class ServiceClient:
    """Calls the RPCs of one service, by name, with protobuf messages."""

    def __init__(self, client: Client, service: str) -> None:
        self.client = client
        self.service = service

    async def call(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        payload = await self.client.call(
            self.service,
            method,
            request.SerializeToString(),
            timeout=timeout,
            metadata=metadata,
        )
        return self._parse(response_type, payload, method)

    async def stream(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncIterator[M]:
        payloads = self.client.stream(
            self.service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        try:
            async for payload in payloads:
                yield self._parse(response_type, payload, method)
        finally:
            # Ends the call now when the consumer stops early, not at garbage collection.
            await payloads.aclose()

    async def call_client_stream(
        self,
        method: str,
        requests: AsyncIterable[Message],
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        payloads = (request.SerializeToString() async for request in requests)
        payload = await self.client.call_client_stream(
            self.service, method, payloads, timeout=timeout, metadata=metadata
        )
        return self._parse(response_type, payload, method)

    def _parse(self, message_type: type[M], payload: bytes, method: str) -> M:
        return _parse(message_type, payload, f"response of {self.service}.{method}")
