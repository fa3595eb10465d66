"""harpoon.dirs: one root moves every harpoon directory; each directory's own variable
wins over it; the build cache stays shared."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harpoon import dirs

ALL_VARIABLES = (
    dirs.ROOT_ENV,
    dirs.RUN_DIR_ENV,
    dirs.GUEST_DIR_ENV,
    dirs.TEMPLATE_DIR_ENV,
    dirs.CACHE_DIR_ENV,
    dirs.TOOLS_DIR_ENV,
    dirs.IMAGE_CACHE_ENV,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def layout() -> dict[str, str]:
    return {
        "state": dirs.state_dir(),
        "run": dirs.run_dir(),
        "guest": dirs.guest_dir(),
        "templates": dirs.template_dir(),
        "cache": dirs.cache_dir(),
        "tools": dirs.tools_dir(),
        "images": dirs.image_cache_dir(),
    }


def test_without_a_root_the_directories_are_the_machines() -> None:
    assert layout() == {
        "state": "/var/lib/harpoon",
        "run": "/run/harpoon",
        "guest": "/var/lib/harpoon/guest",
        "templates": "/var/lib/harpoon/templates",
        "cache": "/var/cache/harpoon",
        "tools": "/var/cache/harpoon/tools",
        "images": "/var/cache/harpoon/images",
    }


def test_a_root_moves_state_and_run_but_not_the_build_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(dirs.ROOT_ENV, "/srv/hp")
    assert layout() == {
        "state": "/srv/hp/lib",
        "run": "/srv/hp/run",
        "guest": "/srv/hp/lib/guest",
        "templates": "/srv/hp/lib/templates",
        "cache": "/var/cache/harpoon",
        "tools": "/var/cache/harpoon/tools",
        "images": "/var/cache/harpoon/images",
    }


def test_a_relative_root_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dirs.ROOT_ENV, "hp-root")
    assert dirs.run_dir() == os.path.join(os.getcwd(), "hp-root", "run")


def test_each_directorys_own_variable_wins_over_the_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dirs.ROOT_ENV, "/srv/hp")
    monkeypatch.setenv(dirs.RUN_DIR_ENV, "/r")
    monkeypatch.setenv(dirs.GUEST_DIR_ENV, "/g")
    monkeypatch.setenv(dirs.TEMPLATE_DIR_ENV, "/t")
    monkeypatch.setenv(dirs.CACHE_DIR_ENV, "/c")
    monkeypatch.setenv(dirs.IMAGE_CACHE_ENV, "/i")
    assert layout() == {
        "state": "/srv/hp/lib",
        "run": "/r",
        "guest": "/g",
        "templates": "/t",
        "cache": "/c",
        "tools": "/c/tools",
        "images": "/i",
    }
    monkeypatch.setenv(dirs.TOOLS_DIR_ENV, "/tools")
    assert dirs.tools_dir() == "/tools"


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dirs.ROOT_ENV, "")
    monkeypatch.setenv(dirs.RUN_DIR_ENV, "")
    assert dirs.run_dir() == "/run/harpoon"


def test_a_socket_path_of_107_bytes_is_accepted_and_108_is_refused() -> None:
    dirs.check_socket_path("/" + "s" * 106)
    with pytest.raises(dirs.SocketPathTooLong) as refused:
        dirs.check_socket_path("/" + "s" * 107, "containerd's socket")
    message = str(refused.value)
    assert "containerd's socket" in message and "108 bytes" in message
    assert dirs.ROOT_ENV in message


def test_a_root_too_deep_for_the_vms_sockets_is_refused_up_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(dirs.ROOT_ENV, "/tmp/short")
    dirs.check_run_dir()
    monkeypatch.setenv(dirs.ROOT_ENV, "/tmp/" + "d" * 60)
    with pytest.raises(dirs.SocketPathTooLong, match="run directory"):
        dirs.check_run_dir()


def test_the_shim_and_the_stores_take_their_directories_from_the_root(tmp_path: object) -> None:
    """Read at import by the shim's paths, the accelerator cache, the template store and
    the guest cache: a fresh Python with only HARPOON_ROOT set."""
    code = (
        "from harpoon.shim import paths; from harpoon.vmm import accel;"
        "from harpoon.sandbox.template import TemplateStore; from harpoon.guest import cache;"
        "store = TemplateStore.from_environment(); assert store is not None;"
        "print(paths.vm_state_dir_str('ns', 'c').rsplit('/', 1)[0], accel.CACHE_DIR,"
        " store.root, cache.guest_root(), cache.cache_root())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARIABLES}
    env[dirs.ROOT_ENV] = "/srv/hp"
    env.pop("HARPOON_TEMPLATES", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == [
        "/srv/hp/run/vm",
        "/srv/hp/run",
        "/srv/hp/lib/templates",
        "/srv/hp/lib/guest",
        "/var/cache/harpoon",
    ]
