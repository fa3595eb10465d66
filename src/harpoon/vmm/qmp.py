"""QMP, QEMU's JSON control protocol: a sans-IO protocol object and an asyncio client.

The protocol is newline-delimited JSON. QEMU speaks first (a greeting), the client
must send `qmp_capabilities` before anything else, then every command carries an id
that its reply (`return` or `error`) repeats; asynchronous events arrive in between.
`QmpProtocol` turns bytes into those messages and commands into bytes and never
touches a socket; `QmpClient` runs it over a unix socket, matches replies to callers
and hands events to whoever listens for them (`listen`); an event nobody listens for
is dropped.

Waiting for a state QEMU reports by event goes: listen, issue the command whose effect
is awaited (if any), ask for the current state once (the event may have come before the
listener did), then take events until the state is reached. Never poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from harpoon.vmm.base import VMError

COMMAND_TIMEOUT_S = 10.0
MAX_LINE_BYTES = 1 << 20
MAX_QUEUED_EVENTS = 256


class QmpError(VMError):
    """QEMU refused a command, or the QMP connection broke."""


@dataclass(frozen=True)
class Greeting:
    version: dict[str, Any]
    capabilities: list[str]


@dataclass(frozen=True)
class Reply:
    """The answer to one command: `value` on success, `error_class`/`error` on failure."""

    id: str
    value: Any = None
    error_class: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_class


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any] = field(default_factory=dict)


QmpMessage = Greeting | Reply | Event


class QmpProtocol:
    """Bytes from QEMU in, messages out; commands in, bytes to QEMU out."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._next_id = 0

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[str, bytes]:
        """The id the reply will carry and the bytes to send."""
        self._next_id += 1
        command_id = f"hp-{self._next_id}"
        message: dict[str, Any] = {"execute": name, "id": command_id}
        if arguments:
            message["arguments"] = arguments
        return command_id, json.dumps(message).encode() + b"\n"

    def feed(self, data: bytes) -> list[QmpMessage]:
        """Every complete message in what has arrived so far, in order."""
        self._buffer += data
        messages: list[QmpMessage] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if line:
                messages.append(self._parse(line))
        if len(self._buffer) > MAX_LINE_BYTES:
            raise QmpError(f"a QMP message exceeds {MAX_LINE_BYTES} bytes: not QEMU?")
        return messages

    @staticmethod
    def _parse(line: bytes) -> QmpMessage:
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpError(f"QEMU sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QmpError(f"QEMU sent JSON that is not an object: {line[:200]!r}")
        if "QMP" in message:
            qmp = message["QMP"]
            return Greeting(qmp.get("version", {}), list(qmp.get("capabilities", [])))
        if "event" in message:
            return Event(message["event"], message.get("data") or {})
        if "return" in message:
            return Reply(str(message.get("id", "")), message["return"])
        if "error" in message:
            error = message["error"]
            return Reply(
                str(message.get("id", "")),
                error_class=str(error.get("class", "GenericError")),
                error=str(error.get("desc", "")),
            )
        raise QmpError(f"QEMU sent a QMP message of no known kind: {line[:200]!r}")


class EventListener:
    """The events of some names that QEMU sends while it listens (QmpClient.listen), in
    order. Holds at most MAX_QUEUED_EVENTS unread: a listener that falls that far behind
    has lost track of QEMU's state and fails, rather than queue without bound."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self._events: deque[Event] = deque()
        self._arrived = asyncio.Event()
        self._failure: str | None = None

    async def get(self) -> Event:
        """The next event; once the connection is gone (or the listener overflowed),
        the events that came before, then QmpError."""
        while not self._events:
            if self._failure is not None:
                raise QmpError(f"waiting for QMP events {sorted(self.names)}: {self._failure}")
            self._arrived.clear()
            await self._arrived.wait()
        return self._events.popleft()

    def deliver(self, event: Event) -> None:
        if self._failure is not None:
            return
        if len(self._events) >= MAX_QUEUED_EVENTS:
            self.fail(f"more than {MAX_QUEUED_EVENTS} events were left unread")
            return
        self._events.append(event)
        self._arrived.set()

    def fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        self._arrived.set()


class QmpClient:
    """One QMP connection. Commands may be issued concurrently; replies go to their caller,
    events to the listeners of their name."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = QmpProtocol()
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._greeting: asyncio.Future[Greeting] = asyncio.get_running_loop().create_future()
        self._listeners: set[EventListener] = set()
        self._closed_because: str | None = None
        self._reading = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, socket_path: str, timeout: float = COMMAND_TIMEOUT_S) -> QmpClient:
        """Connects, reads the greeting and leaves capabilities negotiation mode."""
        reader, writer = await asyncio.open_unix_connection(socket_path)
        client = cls(reader, writer)
        # Sent at once, not after the greeting: QEMU reads it once it has greeted, and
        # the connection costs one round trip instead of two.
        negotiated = asyncio.ensure_future(client.execute("qmp_capabilities", timeout=timeout))
        try:
            await asyncio.wait_for(asyncio.shield(client._greeting), timeout)
            await negotiated
        except BaseException:
            await client.close()
            negotiated.cancel()
            with contextlib.suppress(BaseException):
                await negotiated
            raise
        return client

    async def execute_all(
        self, commands: list[tuple[str, dict[str, Any] | None]], timeout: float = COMMAND_TIMEOUT_S
    ) -> list[Any]:
        """Runs commands in order, sent together (QEMU executes them one after the other);
        their return values, or the first failure."""
        replies = await asyncio.gather(
            *(self.execute(command, arguments, timeout) for command, arguments in commands),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    @property
    def greeting(self) -> Greeting | None:
        return self._greeting.result() if self._greeting.done() else None

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> Any:
        """Runs one command and returns its `return` value; QmpError if QEMU refuses."""
        if self._closed_because is not None:
            raise QmpError(f"QMP {command}: {self._closed_because}")
        command_id, data = self._protocol.command(command, arguments)
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = reply
        try:
            self._writer.write(data)
            await self._writer.drain()
            answer = await asyncio.wait_for(reply, timeout)
        except (OSError, TimeoutError) as error:
            raise QmpError(f"QMP {command} got no answer: {error or 'timed out'}") from error
        finally:
            self._pending.pop(command_id, None)
        if not answer.ok:
            raise QmpError(f"QMP {command} failed: {answer.error_class}: {answer.error}")
        return answer.value

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """Receives the events called `names` that arrive from now until the block ends."""
        listener = EventListener(frozenset(names))
        if self._closed_because is not None:
            listener.fail(self._closed_because)
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)

    async def close(self) -> None:
        self._reading.cancel()
        with contextlib.suppress(BaseException):
            await self._reading
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._fail_all("the QMP connection was closed")

    async def _read_loop(self) -> None:
        try:
            while data := await self._reader.read(65536):
                for message in self._protocol.feed(data):
                    self._dispatch(message)
            self._fail_all("QEMU closed the QMP connection (it exited?)")
        except (OSError, QmpError) as error:
            self._fail_all(f"the QMP connection broke: {error}")

    def _dispatch(self, message: QmpMessage) -> None:
        if isinstance(message, Greeting):
            if not self._greeting.done():
                self._greeting.set_result(message)
        elif isinstance(message, Reply):
            waiter = self._pending.get(message.id)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        else:
            for listener in self._listeners:
                if message.name in listener.names:
                    listener.deliver(message)

    def _fail_all(self, reason: str) -> None:
        if self._closed_because is None:
            self._closed_because = reason
        waiters: list[asyncio.Future[Any]] = [self._greeting, *self._pending.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(QmpError(reason))
        for listener in self._listeners:
            listener.fail(reason)
