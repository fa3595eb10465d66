"""Test-wide wiring: markers by directory, and the containerd flavours tests run against.

Tests under tests/e2e/ and tests/conformance/ get the `e2e` marker and tests under
tests/vm/ the `vm` marker automatically, so `pytest -m "not e2e"` runs only what needs
neither root nor daemons.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harpoon.devenv.tools import DEFAULT_FLAVOURS, FLAVOURS

TESTS_DIR = Path(__file__).resolve().parent
#: Marker applied to every test under each directory of tests/.
DIRECTORY_MARKERS = {"e2e": "e2e", "conformance": "e2e", "vm": "vm"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--containerd",
        action="append",
        choices=sorted(FLAVOURS),
        default=None,
        help="containerd flavour(s) the e2e tests run against (repeatable; default: "
        f"$HARPOON_CONTAINERD_FLAVOURS or {' '.join(DEFAULT_FLAVOURS)})",
    )


def selected_flavours(config: pytest.Config) -> list[str]:
    """The flavours chosen on the command line, else in the environment, else the default."""
    chosen: list[str] | None = config.getoption("--containerd")
    if chosen:
        return list(dict.fromkeys(chosen))
    from_env = os.environ.get("HARPOON_CONTAINERD_FLAVOURS", "").split()
    unknown = sorted(set(from_env) - set(FLAVOURS))
    if unknown:
        raise pytest.UsageError(
            f"HARPOON_CONTAINERD_FLAVOURS names unknown flavours {unknown}; "
            f"known: {sorted(FLAVOURS)}"
        )
    return from_env or list(DEFAULT_FLAVOURS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Session scope: one daemon per flavour, and pytest groups the tests by flavour.
    if "containerd_flavour" in metafunc.fixturenames:
        names = selected_flavours(metafunc.config)
        metafunc.parametrize("containerd_flavour", names, ids=names, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            relative = item.path.resolve().relative_to(TESTS_DIR)
        except ValueError:
            continue
        marker = DIRECTORY_MARKERS.get(relative.parts[0])
        if marker is not None:
            item.add_marker(marker)
