"""`harpoon build` through the `harpoon` command alone, on a temporary root of its own
(tests/e2e/front_door.py): nerdctl's build, buildctl and harpoon's buildkitd (its own
containerd namespace, host network: harpoon.system.buildkitd), every RUN step in a VM.

The Dockerfile starts FROM the busybox image `harpoon load` put in harpoon's namespace
(offline: the builder sees harpoon's images). What a build leaves is checked while the
services run (`step_leftovers`: a container or task in buildkitd's namespace, a shim, a
VM or any process naming the root but the two services, a mount under the root), and by
`harpoon system stop` at the module's end (front_door.leftovers). Whether a step's VM
was restored from a template is the shim's line in containerd's log under the root.

Runtime here (2 shared cores, TCG, templates built): ~60-90 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harpoon.devenv.registry import Registry
from harpoon.devenv.tools import BUILDKIT, FLAVOURS
from harpoon.system.layout import BUILDKIT_NAMESPACE
from tests.e2e.front_door import (
    COMMAND_TIMEOUT_S,
    IMAGE,
    POLL_INTERVAL_S,
    SYSTEM_TIMEOUT_S,
    Harpoon,
    harpoon_on_new_root,
    leftovers,
    processes_naming_root,
    services_on_new_root,
    start_system,
    stop_system,
)
from tests.e2e.test_buildkit import CREATED
from tests.prerequisites import unavailable

#: How long a RUN step may take to start (a cold boot under load, ~5-10 s).
STEP_START_TIMEOUT_S = 120.0
#: How long a build interrupted with ^C may take to end (buildctl cancels at once).
CANCEL_TIMEOUT_S = 30.0
#: How long buildkitd may take to delete a cancelled step's container.
CLEAN_UP_TIMEOUT_S = 60.0
SECRET = "the build's secret, never in its image\n"

MULTI_STAGE = """\
FROM docker.io/library/busybox:harpoon AS build
RUN echo built in $(uname -r) > /built
RUN --mount=type=secret,id=s cat /run/secrets/s > /secret
RUN --network=none ip -o link | cut -d: -f2 | tr -d ' ' > /links
RUN ip -o -4 addr show eth0 | awk '{print $4}' > /address
FROM docker.io/library/busybox:harpoon AS final
COPY --from=build /built /secret /links /address /out/
CMD ["cat", "/out/built", "/out/secret", "/out/links", "/out/address"]
"""


@pytest.fixture(scope="module")
def harpoon() -> Iterator[Harpoon]:
    if BUILDKIT.missing_binaries():
        unavailable(f"buildkitd is not built: {BUILDKIT.install_hint()}")
    yield from services_on_new_root()


def ctr(harpoon: Harpoon, *args: str) -> str:
    """ctr on the root's containerd, in buildkitd's namespace."""
    socket = harpoon.run_dir / "containerd" / "containerd.sock"
    return subprocess.run(
        [str(FLAVOURS["2.3"].ctr), "--address", str(socket), "-n", BUILDKIT_NAMESPACE, *args],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=True,
    ).stdout  # fmt: skip


def service_pids(harpoon: Harpoon) -> set[str]:
    pid_files = [harpoon.run_dir / "services" / "containerd.pid",
                 harpoon.run_dir / "buildkit" / "buildkitd.pid"]  # fmt: skip
    return {f.read_text().split()[0] for f in pid_files if f.exists()}


def step_leftovers(harpoon: Harpoon) -> list[str]:
    """What build steps left while the services run: step containers and tasks, shims,
    processes naming the root besides containerd and buildkitd (a VM, a gvproxy),
    mounts under the root."""
    found = [f"container {c}" for c in ctr(harpoon, "containers", "ls", "-q").split()]
    found += [f"task {t}" for t in ctr(harpoon, "tasks", "ls", "-q").split()]
    return found + processes_naming_root(harpoon, besides=service_pids(harpoon))


def eventually_nothing_left(harpoon: Harpoon, timeout_s: float = CLEAN_UP_TIMEOUT_S) -> list[str]:
    """step_leftovers once empty, or at the deadline (a shim exits shortly after its
    task is deleted)."""
    deadline = time.monotonic() + timeout_s
    while (left := step_leftovers(harpoon)) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S * 5)
    return left


@dataclass(frozen=True)
class Build:
    status: int
    output: str
    """harpoon build's stdout and stderr (plain progress)."""
    steps: dict[str, str]
    """Each container the build started -> "restored" or "cold boot" (the shim's log)."""


class Builder:
    """`harpoon build` in contexts of the test's, and the steps' VMs from the log."""

    def __init__(self, harpoon: Harpoon, tmp: Path) -> None:
        self.harpoon = harpoon
        self.tmp = tmp
        self.secret = tmp / "secret"
        self.secret.write_text(SECRET)
        self.log = harpoon.root / "lib" / "log" / "containerd.log"
        self.contexts = 0

    def context(self, dockerfile: str) -> Path:
        self.contexts += 1
        context = self.tmp / f"context-{self.contexts}"
        context.mkdir()
        (context / "Dockerfile").write_text(dockerfile)
        return context

    def offset(self) -> int:
        return self.log.stat().st_size

    def steps_since(self, offset: int) -> dict[str, str]:
        with self.log.open("rb") as log:
            log.seek(offset)
            return dict(CREATED.findall(log.read().decode(errors="replace")))

    def command(self, context: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "harpoon.cli", "build", "--progress", "plain",
                "--secret", f"id=s,src={self.secret}", *args, str(context)]  # fmt: skip

    def build(self, context: Path, *args: str) -> Build:
        offset = self.offset()
        done = subprocess.run(
            self.command(context, *args), env=self.harpoon.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=COMMAND_TIMEOUT_S * 2, check=False,
        )  # fmt: skip
        return Build(done.returncode, done.stdout, self.steps_since(offset))


@pytest.fixture(scope="module")
def builder(harpoon: Harpoon, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    return Builder(harpoon, tmp_path_factory.mktemp("build"))


@dataclass(frozen=True)
class Built:
    context: Path
    image: str
    first: Build


@pytest.fixture(scope="module")
def built(builder: Builder, registry: Registry) -> Iterator[Built]:
    """The multi-stage build, tagged for the registry: `harpoon build -t HOST/app:1 .`"""
    image = f"{registry.host}/app:1"
    context = builder.context(MULTI_STAGE)
    yield Built(context, image, builder.build(context, "-t", image))
    builder.harpoon("rmi", image)


def run_steps(output: str) -> list[str]:
    """The numbers of the RUN steps in plain progress output ("#5")."""
    return [line.split()[0] for line in output.splitlines() if re.match(r"#\d+ \[.*\] RUN ", line)]


def test_a_multi_stage_build_with_a_secret_runs_under_harpoon(
    built: Built, harpoon: Harpoon
) -> None:
    assert built.first.status == 0, built.first.output
    assert f"Loaded image: {built.image}" in built.first.output
    done = harpoon("run", "--rm", built.image)
    assert done.status == 0, done.err
    made_in, secret, *links_and_address = done.out.splitlines()
    # The RUN step ran in a guest: its kernel is not the host's.
    assert made_in.startswith("built in ") and made_in != f"built in {os.uname().release}"
    assert secret == SECRET.strip()
    # --network=none: loopback alone; the default network: the host's under harpoon,
    # a gvproxy of the step's VM.
    assert links_and_address == ["lo", "192.168.127.2/24"]


def test_each_run_step_ran_in_a_vm_restored_from_a_template(built: Built) -> None:
    assert built.first.status == 0, built.first.output
    assert len(run_steps(built.first.output)) == 4
    assert list(built.first.steps.values()) == ["restored"] * 4


def test_a_build_leaves_no_step_container_vm_or_mount(built: Built, harpoon: Harpoon) -> None:
    assert built.first.status == 0, built.first.output
    assert eventually_nothing_left(harpoon) == []


def test_a_second_identical_build_is_all_cached(built: Built, builder: Builder) -> None:
    again = builder.build(built.context, "-t", built.image)
    assert again.status == 0, again.output
    assert again.steps == {}  # no VM started
    runs = run_steps(again.output)
    assert len(runs) == 4
    for number in runs:
        assert f"{number} CACHED" in again.output, again.output


def test_the_built_image_is_pushed_and_pulled_back(
    built: Built, harpoon: Harpoon, registry: Registry
) -> None:
    assert built.first.status == 0, built.first.output
    harpoon.check("push", "--insecure-registry", built.image)
    harpoon.check("rmi", built.image)
    assert built.image not in harpoon.check("images", "--format", "{{.Repository}}:{{.Tag}}")
    harpoon.check("pull", "--insecure-registry", built.image)
    assert harpoon.check("run", "--rm", built.image, "cat", "/out/secret") == SECRET


def test_a_failing_step_fails_the_build_shows_why_and_leaves_nothing(
    builder: Builder, harpoon: Harpoon
) -> None:
    context = builder.context(f"FROM {IMAGE}\nRUN echo {time.time_ns()} > /a\nRUN false\n")
    failed = builder.build(context, "-t", "never-built:1")
    assert failed.status != 0
    assert '"/bin/sh -c false" did not complete successfully: exit code: 1' in failed.output
    assert len(failed.steps) == 2
    assert eventually_nothing_left(harpoon) == []
    assert "never-built" not in harpoon.check("images")


def test_ctrl_c_mid_run_stops_the_build_promptly_and_leaves_nothing(
    builder: Builder, harpoon: Harpoon
) -> None:
    """^C at the terminal: SIGINT to the foreground process group of `harpoon build`
    (nerdctl, exec'd by harpoon, and its buildctl) while a RUN step sleeps."""
    context = builder.context(f"FROM {IMAGE}\nRUN echo {time.time_ns()} && sleep 30\n")
    offset = builder.offset()
    build = subprocess.Popen(
        builder.command(context), env=harpoon.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STEP_START_TIMEOUT_S
        while not builder.steps_since(offset):
            assert build.poll() is None, build.communicate()[0].decode()
            assert time.monotonic() < deadline, "the RUN step never started"
            time.sleep(POLL_INTERVAL_S)
        interrupted = time.monotonic()
        os.killpg(build.pid, signal.SIGINT)
        output = build.communicate(timeout=CANCEL_TIMEOUT_S)[0].decode(errors="replace")
        took_s = time.monotonic() - interrupted
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
            build.wait()
    assert build.returncode != 0, output
    assert "canceled" in output, output
    assert took_s < 10, f"the build took {took_s:.1f} s to stop"
    assert eventually_nothing_left(harpoon) == []


def test_system_stop_after_buildkitd_was_killed_mid_run_leaves_nothing(
    tmp_path: Path,
) -> None:
    """A root of its own: buildkitd SIGKILLed while a RUN step runs in a VM (its step
    container, task and VM are left running: BuildKit labels none of them); `system
    stop` deletes what is in buildkitd's namespace and leaves nothing; the next `start`
    and build work."""
    if BUILDKIT.missing_binaries():
        unavailable(f"buildkitd is not built: {BUILDKIT.install_hint()}")
    harpoon = harpoon_on_new_root()
    builder = Builder(harpoon, tmp_path)
    context = builder.context(f"FROM {IMAGE}\nRUN echo {time.time_ns()} && sleep 60\n")
    build = None
    try:
        start_system(harpoon)
        offset = builder.offset()
        build = subprocess.Popen(
            builder.command(context), env=harpoon.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + STEP_START_TIMEOUT_S
        while not builder.steps_since(offset):
            assert build.poll() is None, build.communicate()[0].decode()
            assert time.monotonic() < deadline, "the RUN step never started"
            time.sleep(POLL_INTERVAL_S)
        pid_file = harpoon.run_dir / "buildkit" / "buildkitd.pid"
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        build.communicate(timeout=CANCEL_TIMEOUT_S)
        assert ctr(harpoon, "tasks", "ls", "-q").split(), "no step was left: no test"
        assert any("qemu" in line for line in leftovers(harpoon)), "no VM ran: no test"
        harpoon.check("system", "stop", timeout=SYSTEM_TIMEOUT_S)
        assert leftovers(harpoon) == []
        harpoon.check("system", "start", timeout=SYSTEM_TIMEOUT_S)
        assert ctr(harpoon, "containers", "ls", "-q") == ""
        again = builder.build(builder.context(f"FROM {IMAGE}\nRUN echo {time.time_ns()}\n"))
        assert again.status == 0, again.output
    finally:
        if build is not None and build.poll() is None:
            build.kill()
            build.wait()
        left = stop_system(harpoon)
    assert left == []
