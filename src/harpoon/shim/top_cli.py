"""`harpoon top CONTAINER`: the container's processes as its VM sees them (ps -ef's
columns), asked of its shim (harpoon.shim.top says why not the host's ps)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from harpoon.shim.top import TopError, processes_of, rows, table

#: containerd's own state directory (a system containerd's `state`).
DEFAULT_CONTAINERD_STATE = Path("/run/containerd")


@click.command()
@click.option("--namespace", "-n", default="default", show_default=True,
              help="containerd namespace of the container.")  # fmt: skip
@click.option("--containerd-state", type=click.Path(path_type=Path),
              default=DEFAULT_CONTAINERD_STATE, show_default=True,
              help="containerd's state directory (its config's `state`).")  # fmt: skip
@click.argument("container")
def top(namespace: str, containerd_state: Path, container: str) -> None:
    """List the processes of CONTAINER (a task id, or a unique prefix of one) inside its
    VM: pids as the container sees them, users from its own /etc/passwd."""
    try:
        _, response = processes_of(containerd_state, namespace, container)
    except TopError as error:
        raise click.ClickException(str(error)) from None
    click.echo(table(rows(response, time.time())), nl=False)
