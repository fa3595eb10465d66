"""`shim -info`: the containerd.types.RuntimeInfo this runtime describes itself with."""

from __future__ import annotations

import sys

from harpoon import __version__
from harpoon.api.containerd.types import introspection_pb2
from harpoon.shim.cli import RUNTIME_NAME


def runtime_info() -> introspection_pb2.RuntimeInfo:
    return introspection_pb2.RuntimeInfo(
        name=RUNTIME_NAME,
        version=introspection_pb2.RuntimeVersion(version=__version__),
    )


def write_info() -> None:
    if not sys.stdin.isatty():
        sys.stdin.buffer.read()  # optional runtime options; nothing in them changes the answer
    sys.stdout.buffer.write(runtime_info().SerializeToString())
    sys.stdout.flush()
