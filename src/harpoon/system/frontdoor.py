"""The front door: `harpoon run|exec|ps|…` is nerdctl on harpoon's services.

Each command in PASSTHROUGH hands its arguments to nerdctl unchanged, once the services
are up (started on demand: they keep running until `harpoon system stop`). harpoon then
*becomes* nerdctl (exec): the terminal, stdio, signals (^C reaches nerdctl) and the exit
status are nerdctl's own. nerdctl reads everything else from harpoon's nerdctl.toml
(NERDCTL_TOML), so no flag is needed; the variables that would override it
(CONTAINERD_ADDRESS…) are dropped.

nerdctl always names a runtime when it creates a container (its `--runtime` defaults
to runc's; containerd's namespace default is not read), so `run` and `create` get
`--runtime io.containerd.harpoon.v1` *first*: a `--runtime` the user gives comes after
it and wins (a repeated flag takes its last value), and nothing after the image is
touched. `top` is not passed through: nerdctl's `top` hands the Pids (QEMU's) to the
host's `ps`; harpoon will answer it through the agent. `build` is BuildKit's, to come.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from harpoon.system import config, services
from harpoon.system.layout import RUNTIME, Layout

#: The nerdctl commands `harpoon` passes through.
PASSTHROUGH = (
    "run", "create", "exec", "ps", "logs", "stop", "start", "restart", "kill", "rm",
    "wait", "cp", "port", "stats", "inspect", "images", "image", "pull", "push", "tag",
    "rmi", "load", "save", "volume", "network", "container", "login", "logout", "compose",
    "events", "info", "version",
)  # fmt: skip
#: Commands (top level, or under `container`) that create a container.
CREATING = ("run", "create")
#: Variables nerdctl would take over nerdctl.toml.
OVERRIDING_ENV = (
    "CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER", "CNI_PATH",
    "NETCONFPATH", "NERDCTL_TOML",
)  # fmt: skip


class NerdctlMissing(RuntimeError):
    pass


def argv(nerdctl: Path, command: str, args: Sequence[str]) -> list[str]:
    """nerdctl's command line for `harpoon COMMAND ARGS`."""
    words = [command, *args]
    if command == "container" and args and args[0] in CREATING:
        words = [command, args[0], "--runtime", RUNTIME, *args[1:]]
    elif command in CREATING:
        words = [command, "--runtime", RUNTIME, *args]
    return [str(nerdctl), *words]


def environment(layout: Layout, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for name in OVERRIDING_ENV:
        env.pop(name, None)
    env["NERDCTL_TOML"] = str(layout.nerdctl_toml)
    return env


def nerdctl_binary() -> Path:
    found = config.find_nerdctl()
    if found is None:
        raise NerdctlMissing(
            "nerdctl not found (built by scripts/install-deps, on PATH, or named by "
            f"${config.NERDCTL_ENV}): run `bash scripts/install-deps`; `harpoon doctor` "
            "checks every piece"
        )
    return found


def exec_nerdctl(
    command: str, args: Sequence[str], progress: Callable[[str], None] = lambda _: None
) -> None:
    """Starts the services if they are not running, then replaces this process with
    nerdctl (never returns)."""
    layout = Layout.current()
    binary = nerdctl_binary()
    if not services.running(layout):
        services.start(layout, progress)
    os.execve(binary, argv(binary, command, args), environment(layout))
