"""`containerd-shim-harpoon-v1`: the command line containerd runs (protocol doc §1).

    <shim> -namespace NS -address A -publish-binary B -id ID [-debug] start
    <shim> -namespace NS -address A -publish-binary B -id ID -bundle DIR [-debug] delete
    <shim> -info | -v
    <shim> -namespace NS -id ID -address A [-debug]       (the daemon; listener on fd 3)

Flags are Go `flag` style (one or two dashes, `-f v` or `-f=v`); unknown flags are
ignored rather than fatal, so a newer containerd's additions do not break us. This
module imports little: `start` runs on every container's critical path.
"""

from __future__ import annotations

import os
import sys
import time

from harpoon import __version__

RUNTIME_NAME = "io.containerd.harpoon.v1"
_VALUE_FLAGS = {
    "namespace",
    "address",
    "publish-binary",
    "id",
    "bundle",
    "socket",
    "debug-socket",
}
_BOOL_FLAGS = {"debug", "v", "info", "version"}


class Flags:
    """The parsed command line. A plain class, not a dataclass: `dataclasses` imports
    `inspect` (~10 ms), and `start` is on every container's critical path."""

    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    info: bool = False
    action: str = ""
    # Wall-clock times of the `start` process, which the forked daemon logs (debug).
    started_at: float = 0.0
    forked_at: float = 0.0

    def __init__(self) -> None:
        self.ignored: list[str] = []

    def __repr__(self) -> str:
        return f"Flags({vars(self)!r})"


def parse_flags(argv: list[str]) -> Flags:
    flags = Flags()
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-") or arg in ("-", "--"):
            if not flags.action:
                flags.action = arg
            continue
        name, has_value, value = arg.lstrip("-").partition("=")
        if name in _VALUE_FLAGS:
            if not has_value:
                value = next(args, "")
            if name == "debug-socket":
                flags.ignored.append(arg)
            else:
                setattr(flags, name.replace("-", "_"), value)
        elif name in _BOOL_FLAGS:
            enabled = (value.lower() not in ("false", "0")) if has_value else True
            if name in ("v", "version"):
                flags.version = enabled
            else:
                setattr(flags, name, enabled)
        else:
            flags.ignored.append(arg)
    return flags


def main(argv: list[str] | None = None) -> None:
    started_at = time.time()
    flags = parse_flags(sys.argv[1:] if argv is None else argv)
    flags.started_at = started_at
    if flags.version:
        name = os.path.basename(sys.argv[0])
        print(f"{name}:\n  Version:  {__version__}\n  Runtime:  {RUNTIME_NAME}")
        return
    if flags.info:
        from harpoon.shim.info import write_info

        write_info()
        return
    if flags.action == "start":
        from harpoon.shim.start import start

        sys.exit(start(flags))
    if flags.action == "delete":
        from harpoon.shim.cleanup import delete_command

        sys.exit(delete_command(flags))
    if flags.action:
        print(f"unknown action {flags.action!r}: expected start or delete", file=sys.stderr)
        sys.exit(2)
    from harpoon.shim.daemon import run_daemon

    sys.exit(run_daemon(flags))
