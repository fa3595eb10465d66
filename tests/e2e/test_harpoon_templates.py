"""VM templates as a user meets them: with none built yet (a new install, a new guest
image), a short `ctr run --rm` boots cold and leaves the template built behind it, and
the next container restores from it. Its own containerd, whose shims use a template
store of this test's."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.tools import Flavour, scripts_dir
from harpoon.sandbox.template import META_NAME, TEMPLATE_DIR_ENV
from harpoon.sandbox.template_builder import BUILD_LOG_NAME

HARPOON = "io.containerd.harpoon.v1"
RUN_TIMEOUT_S = 180.0
BUILD_WAIT_S = 300.0


@pytest.fixture
def store() -> Iterator[Path]:
    # Long on purpose (~100 bytes): the sockets of a build's VMs, at most 107 bytes long,
    # must not be made under it.
    with tempfile.TemporaryDirectory(prefix="hp-tpl-", dir="/tmp") as directory:
        yield Path(directory) / ("a-long-path-to-a-template-store-" * 3).rstrip("-")


@pytest.fixture
def daemon(
    usable_flavour: Flavour, store: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Containerd]:
    # containerd passes its environment to the shims it starts.
    monkeypatch.setenv(TEMPLATE_DIR_ENV, str(store))
    daemon = Containerd(usable_flavour, path_prepend=[scripts_dir()], log_level="debug")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.remove_all_containers()
        daemon.stop()


def run(daemon: Containerd, image: str, container_id: str, *flags: str) -> str:
    result = daemon.ctr(
        "run", "--rm", "--runtime", HARPOON, *flags, image, container_id, "echo", "hi",
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert result.stdout == "hi\n"
    return daemon.log_path.read_text(errors="replace")


def test_a_short_cold_container_leaves_its_template_for_the_next(
    daemon: Containerd, busybox_image_tar: Path, store: Path
) -> None:
    image = daemon.import_image(busybox_image_tar)
    log = run(daemon, image, "first")
    assert "restored first" not in log and "no VM template" in log
    deadline = time.monotonic() + BUILD_WAIT_S
    while not list(store.glob(f"*/{META_NAME}")):
        assert time.monotonic() < deadline, (store / BUILD_LOG_NAME).read_text()
        time.sleep(0.5)
    assert "restored second from template" in run(daemon, image, "second")
    # 64 MiB + the guest's overhead rounds up to the default VM size: the same template.
    limited = run(daemon, image, "third", "--memory-limit", str(64 << 20))
    assert "restored third from template" in limited
    # Host paths bound in go through the share every VM has: the same template.
    bound = run(
        daemon, image, "fourth", "--mount", f"type=bind,src={store},dst=/s,options=rbind:ro"
    )
    assert "restored fourth from template" in bound
    # The builder is gone with its build: no staging directory, no VM.
    while list(store.glob(".build-*")):
        assert time.monotonic() < deadline, "the builder left its staging directory"
        time.sleep(0.5)
