"""Images the real way: the locally built images pushed to a local registry on
127.0.0.1 (Debian's docker-registry, harpoon.devenv.registry), removed, pulled back and
run under harpoon — the busybox image and the Debian one (nginx, python3)."""

from __future__ import annotations

import pytest

from harpoon.devenv.registry import Registry
from tests.e2e.differential import HARPOON
from tests.e2e.nerdctl import Nerdctl

pytestmark = pytest.mark.vm


def through_the_registry(nerdctl: Nerdctl, registry: Registry, image: str, name: str) -> str:
    """Tags `image` as REGISTRY/NAME, pushes it, removes it locally and pulls it back:
    the reference it now runs as."""
    remote = f"{registry.host}/{name}"
    insecure = ("--insecure-registry",)
    nerdctl.check("tag", image, remote)
    nerdctl.check("push", *insecure, remote)
    nerdctl.check("rmi", remote)
    assert remote not in nerdctl.check("images", "--format", "{{.Repository}}:{{.Tag}}")
    nerdctl.check("pull", *insecure, remote)
    return remote


def test_busybox_pulled_from_the_local_registry_runs_under_harpoon(
    nerdctl: Nerdctl, registry: Registry
) -> None:
    remote = through_the_registry(nerdctl, registry, nerdctl.image, "busybox:pulled")
    try:
        run = nerdctl.run(HARPOON, "--rm", remote, "echo", "hello from the registry")
    finally:
        nerdctl.check("rmi", remote)
    assert (run.status, run.out, run.err) == (0, "hello from the registry\n", "")


def test_the_debian_image_pulled_from_the_local_registry_runs_python_under_harpoon(
    nerdctl: Nerdctl, registry: Registry, debian_web_image: str
) -> None:
    remote = through_the_registry(nerdctl, registry, debian_web_image, "debian-web:pulled")
    try:
        run = nerdctl.run(HARPOON, "--rm", remote, "python3", "-c", "print(6 * 7)")
    finally:
        nerdctl.check("rmi", remote)
    assert (run.status, run.out, run.err) == (0, "42\n", "")
