"""`harpoon top CONTAINER`: the container's processes as its VM sees them (ps -ef's
columns), asked of its shim (harpoon.shim.top says why not the host's ps).

By default the container is one of harpoon's own services' (harpoon.system: its
containerd's state, the `harpoon` namespace), named as `harpoon ps` names it (a name, an
id or an id's prefix). `--containerd-state` points at another containerd (a system one:
/run/containerd), whose tasks are named by id or a prefix of one."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import click

from harpoon.shim.top import TopError, find_container, processes_of, rows, table

#: A system containerd's default namespace (ctr's and nerdctl's).
DEFAULT_NAMESPACE = "default"
INSPECT_TIMEOUT_S = 60.0


def _harpoon_container(layout_state: Path, namespace: str, name: str) -> str:
    """The id of a container of harpoon's services that `name` (a nerdctl name, an id
    or a prefix of one) names."""
    try:
        return find_container(layout_state, namespace, name)
    except TopError:
        pass
    from harpoon.system import frontdoor
    from harpoon.system.layout import Layout

    try:
        nerdctl = frontdoor.nerdctl_binary()
    except frontdoor.NerdctlMissing as error:
        raise TopError(str(error)) from None
    done = subprocess.run(
        frontdoor.argv(nerdctl, "inspect", ["--type", "container", "--format", "{{.ID}}", name]),
        env=frontdoor.environment(Layout.current()), capture_output=True, text=True,
        timeout=INSPECT_TIMEOUT_S, check=False,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        raise TopError(f"no container {name!r} in harpoon's services") from None
    return done.stdout.strip()


@click.command()
@click.option("--namespace", "-n", default=None,
              help="containerd namespace of the container (default: harpoon's own, "
                   f"or {DEFAULT_NAMESPACE!r} with --containerd-state).")  # fmt: skip
@click.option("--containerd-state", type=click.Path(path_type=Path), default=None,
              help="Another containerd's state directory (its config's `state`, e.g. "
                   "/run/containerd); default: harpoon's own containerd's.")  # fmt: skip
@click.argument("container")
def top(namespace: str | None, containerd_state: Path | None, container: str) -> None:
    """List the processes of CONTAINER inside its VM: pids as the container sees them,
    users from its own /etc/passwd."""
    try:
        if containerd_state is None:
            from harpoon.system.layout import NAMESPACE, Layout

            containerd_state = Layout.current().containerd_state
            namespace = namespace or NAMESPACE
            container_id = _harpoon_container(containerd_state, namespace, container)
        else:
            namespace = namespace or DEFAULT_NAMESPACE
            container_id = find_container(containerd_state, namespace, container)
        response = processes_of(containerd_state, namespace, container_id)
    except TopError as error:
        raise click.ClickException(str(error)) from None
    click.echo(table(rows(response, time.time())), nl=False)
