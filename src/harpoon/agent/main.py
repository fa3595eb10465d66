"""Placeholder entry point of the guest agent (being written); its imports are the real set."""

import asyncio  # noqa: F401
import ctypes  # noqa: F401
import os  # noqa: F401
import signal  # noqa: F401
import struct  # noqa: F401
import time  # noqa: F401

from harpoon.api.agent.v1 import agent_pb2  # noqa: F401


def main() -> None:
    print("harpoon-agent: placeholder", flush=True)
