"""`python -m harpoon.shim …`: the same as the containerd-shim-harpoon-v1 script."""

from harpoon.shim.cli import main

main()
