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
touched. nerdctl compose runs nerdctl for each service without that flag: `compose`
gets the project rewritten with harpoon's runtime (harpoon.system.compose). `build` (and
`builder`) also need buildkitd, started on demand like containerd: nerdctl runs
`buildctl` from PATH (the BuildKit tools' directory goes first) against BUILDKIT_HOST
(harpoon's buildkitd; a `--buildkit-host` of the user's wins), and loads the image into
harpoon's namespace (harpoon.system.buildkitd says how, and how a `FROM` finds harpoon's
images). buildctl is nerdctl's child, in its process group: a ^C at the terminal
reaches both, and buildctl cancels the build (buildkitd then deletes the step's
container, its VM with it). `top` is not passed through: nerdctl's `top` hands the
Pids (QEMU's) to the host's `ps`; `harpoon top` asks the agent (harpoon.shim.top).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from harpoon.system import buildkitd, compose, config, services
from harpoon.system.layout import RUNTIME, Layout

#: The nerdctl commands `harpoon` passes through.
PASSTHROUGH = (
    "run", "create", "exec", "ps", "logs", "stop", "start", "restart", "kill", "rm",
    "wait", "cp", "port", "stats", "inspect", "images", "image", "pull", "push", "tag",
    "rmi", "load", "save", "volume", "network", "container", "login", "logout", "compose",
    "events", "info", "version", "build", "builder",
)  # fmt: skip
#: Commands that run BuildKit (buildctl against harpoon's buildkitd).
BUILDING = ("build", "builder")
#: How long `nerdctl compose config` may take (it reads files and asks containerd).
COMPOSE_CONFIG_TIMEOUT_S = 60.0
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
    env = environment(layout)
    needed = ["containerd"]
    if command in BUILDING:
        env = buildkitd.build_environment(layout, buildkitd.binaries(), env)
        needed.append(buildkitd.NAME)
    if not services.running(layout, needed):
        services.start(layout, progress, needed)
    if command == "compose":
        args = compose_args(binary, args, layout)
    if command == "build":
        buildkitd.share_images(layout, progress)
    os.execve(binary, argv(binary, command, args), env)


def compose_args(nerdctl: Path, args: Sequence[str], layout: Layout) -> list[str]:
    """`compose ARGS` with every service given harpoon's runtime unless it names one
    (harpoon.system.compose says why and how); ARGS as they are when compose cannot
    read the project (nerdctl then says why) or the subcommand is `config`."""
    try:
        globals_, subcommand, rest = compose.split(args)
    except compose.ComposeError:
        return list(args)
    if subcommand in compose.AS_WRITTEN or not subcommand:
        return list(args)
    done = subprocess.run(
        [str(nerdctl), "compose", *globals_, "config"], env=environment(layout),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        timeout=COMPOSE_CONFIG_TIMEOUT_S,
    )  # fmt: skip
    if done.returncode != 0:
        return list(args)
    project = compose.write_project(
        compose.with_harpoon_runtime(done.stdout), layout.run / "compose"
    )
    return compose.rewritten_args(globals_, subcommand, rest, project, Path.cwd())
