"""The host's end of bench/net.py: TCP clients that time what they do, from asyncio.

Each takes an address the caller has checked is on this machine. A client that gets a
wrong answer raises Failed; one that cannot connect raises OSError; none retries.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
MIB = 1 << 20
#: Bytes written per send and read per receive.
CHUNK_BYTES = MIB
#: One HTTP request or echo exchange.
REQUEST_TIMEOUT_S = 10.0


class Failed(Exception):
    """One figure's run did not count; the message says why."""


def free_port() -> int:
    """A TCP port free on the host's loopback now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


async def within_request_timeout(request: Awaitable[T]) -> T:
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        return await request


async def connect(address: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, CHUNK_BYTES):
        data += chunk
    return bytes(data)


async def count_to_eof(sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    buffer = bytearray(CHUNK_BYTES)
    count = 0
    while received := await loop.sock_recv_into(sock, buffer):
        count += received
    return count


async def send_then_read(address: str, port: int, size: int) -> tuple[float, bytes]:
    """Connects, sends size zero bytes, shuts the write side and reads the answer to
    EOF; connect → EOF, and the answer."""
    loop = asyncio.get_running_loop()
    payload = memoryview(bytes(CHUNK_BYTES))
    began = time.monotonic()
    with await connect(address, port) as sock:
        left = size
        while left > 0:
            await loop.sock_sendall(sock, payload[: min(left, CHUNK_BYTES)])
            left -= CHUNK_BYTES
        sock.shutdown(socket.SHUT_WR)
        answer = await read_to_eof(sock)
    return time.monotonic() - began, answer


async def accept_and_count(listener: socket.socket) -> tuple[float, int]:
    """Accepts one connection on a non-blocking listener and reads it to EOF; accept →
    EOF, and the bytes received."""
    connection, _ = await asyncio.get_running_loop().sock_accept(listener)
    with connection:
        began = time.monotonic()
        count = await count_to_eof(connection)
        return time.monotonic() - began, count


async def http_get(port: int) -> float:
    """One `GET /` on a new connection to 127.0.0.1:port, read to EOF; its time. The
    answer must be 200."""
    began = time.monotonic()
    with await connect(LOOPBACK, port) as sock:
        await asyncio.get_running_loop().sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n")
        answer = await read_to_eof(sock)
    seconds = time.monotonic() - began
    status = answer.split(b"\r\n", 1)[0].split()
    if status[:1] not in ([b"HTTP/1.0"], [b"HTTP/1.1"]) or status[1:2] != [b"200"]:
        raise Failed(f"GET / answered {answer[:80]!r}")
    return seconds


async def echo_round_trips(port: int, count: int, warmup: int) -> list[float]:
    """Round trips of one byte on one connection to 127.0.0.1:port (Nagle off): warmup
    unmeasured, then count measured; their times."""
    loop = asyncio.get_running_loop()
    times = []
    with await connect(LOOPBACK, port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(warmup + count):
            began = time.monotonic()
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await loop.sock_sendall(sock, b"x")
                echoed = await loop.sock_recv(sock, 1)
            if echoed != b"x":
                raise Failed(f"echo {index}: got {echoed!r} back")
            if index >= warmup:
                times.append(time.monotonic() - began)
    return times
