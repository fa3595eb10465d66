"""`harpoon system start|stop|status`, `harpoon doctor` and the nerdctl commands of the
front door, as click commands; `install(main)` adds them all to `harpoon`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from harpoon import dirs
from harpoon.system import doctor as checks
from harpoon.system import frontdoor, services
from harpoon.system.layout import Layout

#: Progress and errors go to stderr (stdout is the command's: `harpoon ps -q`).
console = Console(stderr=True, highlight=False)


def progress(message: str) -> None:
    console.print(f"[dim]harpoon:[/dim] {message}", markup=True)


def _fail(error: Exception) -> None:
    console.print(f"harpoon: {error}", markup=False, style="red")
    sys.exit(1)


def print_status(statuses: list[services.ServiceStatus]) -> None:
    out = Console(highlight=False)
    if out.is_terminal:
        table = Table("service", "pid", "healthy", "socket", "log", "what")
        for s in statuses:
            table.add_row(s.name, str(s.pid or "-"), "yes" if s.healthy else "no",
                          str(s.socket), str(s.log), s.origin)  # fmt: skip
        out.print(table)
        return
    for s in statuses:
        healthy = "healthy" if s.healthy else "not-running" if s.pid is None else "unhealthy"
        click.echo(f"{s.name} pid={s.pid or '-'} {healthy} socket={s.socket} log={s.log}")


@click.group()
def system() -> None:
    """harpoon's own services (containerd, buildkitd), under HARPOON_ROOT or /var/lib/harpoon and
    /run/harpoon."""


@system.command()
def start() -> None:
    """Start the services (after cleaning up what a crash left); they keep running."""
    try:
        with console.status("starting harpoon's services…", spinner="dots"):
            print_status(services.start(Layout.current(), progress))
    except (services.ServiceError, dirs.SocketPathTooLong, OSError) as error:
        _fail(error)


@system.command()
def stop() -> None:
    """Stop the containers and the services; remove what they leave (VMs, shims,
    mounts, network namespaces, sockets, pid files)."""
    try:
        with console.status("stopping harpoon's services…", spinner="dots"):
            services.stop(Layout.current(), progress)
    except (services.ServiceError, OSError) as error:
        _fail(error)


@system.command()
def status() -> None:
    """Each service: pid, socket, log, and whether it answers. Exits 3 if one does not
    (buildkitd not started yet is fine: `harpoon build` starts it)."""
    try:
        statuses = services.status(Layout.current())
    except services.ServiceError as error:
        _fail(error)
        return
    print_status(statuses)
    if not all(s.ok for s in statuses):
        sys.exit(3)


@click.command()
@click.option(
    "--containerd-config",
    type=click.Path(path_type=Path),
    default=None,
    help="macOS: the config.toml containerd runs with (default $HARPOON_CONTAINERD_CONFIG, "
    "else /etc/containerd/config.toml or Homebrew's etc/containerd/config.toml).",
)
def doctor(containerd_config: Path | None) -> None:
    """Check every piece harpoon needs; print the fix for each missing one."""
    results = checks.examine(checks.checks_for(containerd_config=containerd_config))
    for result in results:
        click.echo(result.line)
    note = checks.euid_note()
    if note:
        click.echo(f"note: {note}")
    if not checks.healthy(results):
        sys.exit(1)


#: Every argument, options and --help included, is nerdctl's.
PASSTHROUGH_SETTINGS = {
    "ignore_unknown_options": True,
    "allow_interspersed_args": False,
    "help_option_names": [],
}


def passthrough(name: str) -> click.Command:
    """`harpoon NAME ARGS…`: nerdctl NAME ARGS… on harpoon's services."""

    @click.command(
        name,
        context_settings=PASSTHROUGH_SETTINGS,
        help=f"nerdctl {name} on harpoon's services (every argument is nerdctl's).",
        add_help_option=False,
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        try:
            frontdoor.exec_nerdctl(name, args, progress)
        except (frontdoor.NerdctlMissing, services.ServiceError, OSError) as error:
            _fail(error)

    return command


def install(main: click.Group) -> None:
    """Adds `system`, `doctor` and the front door's commands to `harpoon`."""
    main.add_command(system)
    main.add_command(doctor)
    for name in frontdoor.PASSTHROUGH:
        main.add_command(passthrough(name))
