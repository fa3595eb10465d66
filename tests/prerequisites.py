"""What a test does when the machine lacks something it needs (root, a tool, an image)."""

from __future__ import annotations

import pytest

from harpoon.devenv.tools import in_ci


def unavailable(reason: str) -> None:
    """Skips, except in CI, where the machine is supposed to have everything."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure)", pytrace=False)
    pytest.skip(reason)
