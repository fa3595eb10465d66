"""A stand-in for the vfkit program, for unit tests of the host's side (harpoon.vmm.vfkit):
no VM, no guest; what vfkit does around one (cmd/vfkit/main.go, pkg/rest, pkg/vf):

- it serves the REST API on `--restful-uri unix://PATH` from the start (GET and POST
  /vm/state: Pause, Resume, HardStop; Stop is ignored, as a guest without a power-button
  handler ignores it);
- after $FAKE_VFKIT_BOOT_S (the VM reaching Running) it listens on each `virtio-vsock,
  ...,socketURL=PATH,connect` socket and closes every connection at once (no guest
  listens);
- it writes "VM running" to `virtio-serial,logFilePath=`;
- it exits 0 once the VM stops (HardStop, SIGTERM, SIGINT), its sockets removed;
- with $FAKE_VFKIT_FAIL it prints that to stderr and exits 1 at once;
- its argv goes to $FAKE_VFKIT_ARGV, one argument a line, if set.

Run as a program (the test writes it out with a shebang); imports the stdlib alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys


def options(argv: list[str]) -> tuple[str, list[str], str]:
    rest, vsock, console = "", [], ""
    for flag, value in itertools.pairwise(argv):
        if flag == "--restful-uri":
            rest = value.removeprefix("unix://")
        elif flag == "--device" and value.startswith("virtio-vsock,"):
            fields = dict(part.partition("=")[::2] for part in value.split(","))
            vsock.append(fields["socketURL"])
        elif flag == "--device" and value.startswith("virtio-serial,"):
            console = value.partition("logFilePath=")[2]
    return rest, vsock, console


class FakeVfkit:
    def __init__(self, argv: list[str]) -> None:
        self.rest, self.vsock, self.console = options(argv)
        self.state = "Starting"
        self.stopped = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopped.set)
        servers = [await asyncio.start_unix_server(self.answer, self.rest)]
        await asyncio.sleep(float(os.environ.get("FAKE_VFKIT_BOOT_S", "0")))
        self.state = "Running"
        with open(self.console, "a") as console:
            console.write("VM running\n")
        for path in self.vsock:
            servers.append(await asyncio.start_unix_server(self.no_guest, path))
        await self.stopped.wait()
        for server in servers:
            server.close()
        for path in (self.rest, *self.vsock):
            os.unlink(path)
        return 0

    async def no_guest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = 0
        for line in head.split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":")[1])
        body = await reader.readexactly(length)
        if head.startswith("GET /vm/state "):
            status, answer = "200 OK", {"state": f"VirtualMachineState{self.state}"}
        else:
            status, answer = self.change(json.loads(body)["state"])
        data = json.dumps(answer).encode() if answer else b""
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        writer.close()

    def change(self, change: str) -> tuple[str, dict[str, str] | None]:
        allowed = {"Pause": ("Running", "Paused"), "Resume": ("Paused", "Running")}
        if change == "HardStop":
            self.state = "Stopped"
            asyncio.get_running_loop().call_later(0.05, self.stopped.set)
        elif change in allowed:
            before, after = allowed[change]
            if self.state != before:
                return "500 Internal Server Error", {"error": "Invalid virtual machine state"}
            self.state = after
        elif change != "Stop":
            return "500 Internal Server Error", {"error": f"invalid new VMState: {change}"}
        return "202 Accepted", None


def main() -> int:
    if os.environ.get("FAKE_VFKIT_ARGV"):
        with open(os.environ["FAKE_VFKIT_ARGV"], "w") as record:
            record.write("\n".join(sys.argv) + "\n")
    if os.environ.get("FAKE_VFKIT_FAIL"):
        print(f"Error: {os.environ['FAKE_VFKIT_FAIL']}", file=sys.stderr)
        return 1
    return asyncio.run(FakeVfkit(sys.argv).run())


if __name__ == "__main__":
    sys.exit(main())
