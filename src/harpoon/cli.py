"""The `harpoon` command: a click group; each part of harpoon adds its own subgroup."""

from __future__ import annotations

import click

from harpoon.guest.cli import guest
from harpoon.shim.template_cli import template
from harpoon.shim.top_cli import top
from harpoon.system.cli import install as install_front_door


@click.group()
@click.version_option(package_name="harpoon")
def main() -> None:
    """harpoon: run every container in its own Linux VM."""


# One line per subgroup; each lives beside the code it drives.
main.add_command(guest)
main.add_command(template)
main.add_command(top)
install_front_door(main)


if __name__ == "__main__":
    main()
