"""Fixtures that give e2e tests a real containerd per flavour and a busybox image in it.

`containerd` (per test) is the session's daemon of one flavour, checked after the test:
a leaked task, container, shim or mount fails that test's teardown and is cleaned up, so
one broken test cannot poison the next. Tests are parametrized over the selected
flavours ("1.6", "2.3"; see tests/conftest.py); each daemon starts once per session.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.devenv.debian_image import build_debian_image
from harpoon.devenv.images import (
    BUSYBOX_REF,
    ImageBuildError,
    build_busybox_image,
    default_cache_dir,
)
from harpoon.devenv.nerdctl import MINIMUM_CONTAINERD, version_tuple
from harpoon.devenv.registry import REGISTRY_BINARY, Registry
from harpoon.devenv.tools import NERDCTL, Flavour, flavour, scripts_dir
from tests.e2e.leaks import fail_on_leaks
from tests.e2e.nerdctl import Nerdctl
from tests.prerequisites import unavailable


@pytest.fixture(scope="session")
def usable_flavour(containerd_flavour: str) -> Flavour:
    """The flavour under test, once root and its binaries are known to be there."""
    if os.geteuid() != 0:
        unavailable("e2e tests need root: containerd and runc run as root")
    f = flavour(containerd_flavour)
    missing = f.missing_binaries()
    if missing:
        unavailable(
            f"containerd {f.name} binaries missing ({', '.join(map(str, missing))}): "
            f"{f.install_hint()}"
        )
    return f


@pytest.fixture(scope="session")
def containerd_session(usable_flavour: Flavour) -> Iterator[Containerd]:
    """One running containerd of the flavour, shared by the session, stopped at its end."""
    f = usable_flavour
    log_dir = os.environ.get("HARPOON_LOG_DIR")
    daemon = Containerd(
        f,
        # containerd must find containerd-shim-harpoon-v1 of *this* checkout's install.
        path_prepend=[scripts_dir()],
        log_dir=Path(log_dir) if log_dir else None,
        log_level=os.environ.get("HARPOON_CONTAINERD_LOG_LEVEL", "debug"),
    )
    daemon.start()
    try:
        yield daemon
    finally:
        report = daemon.stop()
        if not report.clean:
            warnings.warn(f"containerd {f.name} at session end: {report}", stacklevel=1)


@pytest.fixture(scope="session")
def busybox_image_tar() -> Path:
    """The busybox OCI image-layout tarball (built once per machine and cached)."""
    if not Path("/bin/busybox").exists():
        unavailable("busybox-static is not installed: run scripts/install-deps")
    return build_busybox_image(default_cache_dir(), BUSYBOX_REF)


@pytest.fixture(scope="session")
def busybox_image(containerd_session: Containerd, busybox_image_tar: Path) -> str:
    """The reference of the busybox image, imported into the session's containerd."""
    return containerd_session.import_image(busybox_image_tar)


@pytest.fixture(scope="session")
def debian_web_image(containerd_session: Containerd) -> str:
    """The reference of the Debian image (nginx, python3: harpoon.devenv.debian_image),
    built once per machine from Debian's archive and cached, imported into the session's
    containerd."""
    try:
        tar = build_debian_image(default_cache_dir())
    except ImageBuildError as error:
        unavailable(str(error))
    return containerd_session.import_image(tar)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A local registry (Debian's docker-registry) on 127.0.0.1, for the session."""
    if not REGISTRY_BINARY.exists():
        unavailable("docker-registry is not installed: run scripts/install-deps")
    with Registry() as running:
        yield running


@pytest.fixture(scope="session")
def nerdctl_session(usable_flavour: Flavour, request: pytest.FixtureRequest) -> Iterator[Nerdctl]:
    """nerdctl for the session's containerd (tests/e2e/nerdctl.py says how it is set up),
    its state in a temporary directory removed at the end; skipped on containerd < 1.7."""
    if version_tuple(usable_flavour.version) < MINIMUM_CONTAINERD:
        minimum = ".".join(map(str, MINIMUM_CONTAINERD))
        pytest.skip(
            f"nerdctl {NERDCTL.version} supports containerd {minimum} and later, "
            f"not {usable_flavour.version}"
        )
    if NERDCTL.missing_binaries():
        unavailable(f"nerdctl is not built: {NERDCTL.install_hint()}")
    image: str = request.getfixturevalue("busybox_image")
    daemon: Containerd = request.getfixturevalue("containerd_session")
    nerdctl = Nerdctl(NERDCTL.binary, daemon, Path(tempfile.mkdtemp(prefix="hp-nerdctl-")), image)
    try:
        yield nerdctl
    finally:
        try:
            nerdctl.remove_all()
        finally:
            shutil.rmtree(nerdctl.base, ignore_errors=True)


@pytest.fixture
def nerdctl(nerdctl_session: Nerdctl, containerd: Containerd) -> Iterator[Nerdctl]:
    """The session's nerdctl; the containers and volumes a test leaves are removed
    (`nerdctl rm -f`, `nerdctl volume rm`) before the `containerd` fixture's leak check."""
    yield nerdctl_session
    nerdctl_session.remove_all()


@pytest.fixture
def containerd(containerd_session: Containerd) -> Iterator[Containerd]:
    """The session's containerd; the test must leave no task, container, shim or mount."""
    yield containerd_session
    fail_on_leaks(containerd_session)


@pytest.fixture
def container_id(request: pytest.FixtureRequest) -> str:
    """A container ID unique to this test run, named after the test for the logs."""
    # containerd ids may not have two separators in a row: no "-" left at the cut.
    stem = request.node.originalname.removeprefix("test_").replace("_", "-")[:40].rstrip("-")
    return f"{stem}-{secrets.token_hex(4)}"
