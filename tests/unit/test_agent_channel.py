"""The agent's end of a virtio-serial port (harpoon.agent.channel), on a FIFO: like the
port, a character file opened once read-write, read and written through two halves."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from harpoon.agent.channel import open_port


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_closing_the_writer_closes_both_halves(tmp_path: Path) -> None:
    """A host that goes away ends the connection; the agent closes the port to open it
    again. Closing must neither raise (it raised NotImplementedError in wait_closed,
    which powered the VM off) nor leave the read half's descriptor open."""
    fifo = tmp_path / "port"
    os.mkfifo(fifo)

    async def cycle() -> bytes:
        reader, writer = await open_port(str(fifo))
        writer.write(b"ping")
        await writer.drain()
        echoed = await reader.readexactly(4)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
        await asyncio.sleep(0)  # let the read half's transport finish closing
        return echoed

    async def main() -> None:
        before = open_fds()
        assert await cycle() == b"ping"
        assert open_fds() == before
        assert await cycle() == b"ping"  # and the port opens again
        assert open_fds() == before

    asyncio.run(main())
