"""What containerd published while a block ran, from `ctr events`, with no timing guess.

`ctr events` subscribes some time after it starts, and an event is delivered some time
after it happened: both ends of the block are marked by an event the test causes itself
(a label set on the session's namespace, published as /namespaces/update with the
label in it), sent again until `ctr events` shows one. The block's events are the ones
between the two markers, in containerd's order.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator

from harpoon.devenv.containerd import Containerd
from tests.e2e.test_harpoon_run import ctr_command

MARKER_LABEL = "harpoon-test-marker"
#: How long `ctr events` gets to show a marker.
MARKER_TIMEOUT_S = 30.0
#: How long a marker gets before another is sent (`ctr events` may not be subscribed).
MARKER_RESEND_S = 0.5
POLL_INTERVAL_S = 0.05


class EventStream:
    """`ctr events`' lines as they come."""

    def __init__(self, daemon: Containerd) -> None:
        self.daemon = daemon
        self.lines: list[str] = []
        self._process = subprocess.Popen(
            ctr_command(daemon, "events"), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name="ctr-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line.rstrip("\n"))

    def mark(self) -> int:
        """Publishes a marker until one comes through (one published before `ctr events`
        subscribed never does); the index of its line."""
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while True:
            token = secrets.token_hex(8)
            label = f"{MARKER_LABEL}={token}"
            self.daemon.ctr("namespaces", "label", self.daemon.namespace, label)
            resend = time.monotonic() + MARKER_RESEND_S
            while time.monotonic() < resend:
                for index, line in enumerate(self.lines):
                    if token in line:
                        return index
                time.sleep(POLL_INTERVAL_S)
            assert time.monotonic() < deadline, "ctr events never showed a marker event"

    def close(self) -> None:
        self._process.terminate()
        self._process.wait()
        self._reader.join()
        # An empty value removes the label.
        self.daemon.ctr("namespaces", "label", self.daemon.namespace, f"{MARKER_LABEL}=")


@contextlib.contextmanager
def published(daemon: Containerd) -> Iterator[list[str]]:
    """The topics (with the rest of each line) containerd published while the block ran
    (filled in when it ends): "/containers/create {…}"."""
    stream = EventStream(daemon)
    found: list[str] = []
    try:
        first = stream.mark()
        yield found
        last = stream.mark()
        for line in stream.lines[first + 1 : last]:
            # "<date> <time> <zone> UTC <namespace> <topic> <event>"
            found.append(line.split(" ", 5)[-1])
    finally:
        stream.close()
