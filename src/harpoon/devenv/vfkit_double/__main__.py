"""`python -m harpoon.devenv.vfkit_double ARGS...`: the double as the `vfkit` program."""

import sys

from harpoon.devenv.vfkit_double.program import main

sys.exit(main())
