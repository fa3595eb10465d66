"""The long-running shim, forked by `start` (harpoon.shim.start): its first steps.

It logs to the bundle's `log` FIFO (containerd copies it into its own log), launches
the container's VM from the bundle (harpoon.shim.prestart.launch) and only then loads
asyncio and serves containerd (harpoon.shim.serve): QEMU starts up while those load,
and the guest comes up while containerd connects and sends Create, which then takes
the VM. This module imports nothing that loads asyncio or protobuf.
"""

from __future__ import annotations

import logging
import os
import sys

from harpoon import private
from harpoon.shim import paths
from harpoon.shim.cli import Flags

log = logging.getLogger(__name__)


def _log_to_fifo(debug: bool) -> None:
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass  # no reader (containerd gone): log to whatever stderr is
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if debug else logging.INFO,
        format="time=%(asctime)s level=%(levelname)s msg=%(message)s runtime=harpoon",
    )


def run_daemon(flags: Flags) -> int:
    # Not a child subreaper (runc's shim is one for its runc init): our only children
    # are VMMs we wait for, and orphans of theirs are better left to init to reap.
    _log_to_fifo(flags.debug)
    try:
        # Root's alone, and tightened here if an older harpoon made it looser (its
        # vm/ and share/ are where they are used): every container's daemon begins here.
        private.directory(paths.RUN_DIR)
    except OSError as error:  # the VM's launch will fail and say why
        log.warning("cannot make harpoon's run directory %s private: %s", paths.RUN_DIR, error)
    from harpoon.shim import prestart

    early = prestart.launch(flags.namespace, flags.id, flags.bundle or os.getcwd())
    from harpoon.shim.serve import run

    run(flags, early)
    return 0
