"""BuildKit builds with every RUN step in a harpoon VM (issue 16): a real buildkitd
v0.32.2 (harpoon.devenv.buildkitd: the containerd worker alone, runtime
io.containerd.harpoon.v1) on the session's containerd 2.3, driven with buildctl and buildkitd's
built-in Dockerfile frontend; offline: `FROM` names the busybox image imported into the
namespace buildkitd works in, and the built image lands there too.

One buildkitd for the module in each network mode of harpoon.buildkit: "host" and
"cni" (each step a network namespace of its own, on a bridge and subnet of the
buildkitd's, wired to the VM's tap by harpoon). Each build has a token of its own in
its steps, so no build hits another's cache unless it means to. Every test checks, with
the `containerd` fixture, that no task, container, shim or mount is left, and that no
step's VM, state directory, share, shim socket or netns outlives it (`leftovers`), nor
a mount in buildkitd's scratch directory; the module's teardown, that no mount (the
network namespaces buildkitd keeps for reuse in cni mode) is left once it is stopped.

Runtime here (2 shared cores, TCG): ~40 s for the module once the VM templates exist
(`harpoon template build`, which the module runs first: each step then starts from a
template in ~0.3 s; a cold boot is ~5 s).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harpoon import linux
from harpoon.devenv.buildkitd import BUILD_TIMEOUT_S, Buildkitd
from harpoon.devenv.containerd import Containerd
from harpoon.devenv.tools import BUILDKIT, Flavour
from harpoon.sandbox.template import TemplateStore
from tests.e2e.test_harpoon_run import leftovers
from tests.prerequisites import unavailable

HARPOON = "io.containerd.harpoon.v1"
#: The line harpoon's shim logs (containerd's log) for each container's VM it starts.
CREATED = re.compile(r"created (\S+): VM pid \d+ started in [\d.]+ s \((restored|cold boot)\)")
#: How long a cancelled build's step container may take to be deleted by buildkitd.
CLEAN_UP_TIMEOUT_S = 60.0
#: How long a step container may take to start (a cold boot under load, ~5-10 s).
STEP_START_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.1
SECRET = "the build's secret, never in its image\n"


@dataclass(frozen=True)
class Build:
    status: int
    progress: str
    """buildctl's plain progress output (its stderr)."""
    steps: dict[str, str]
    """Each container the build started -> "restored" or "cold boot" (the shim's log)."""


class Builder:
    """The module's buildkitd, and what one build did, from containerd's log."""

    def __init__(self, buildkitd: Buildkitd, image: str, tmp: Path) -> None:
        self.buildkitd = buildkitd
        self.containerd = buildkitd.containerd
        self.image = image
        self.tmp = tmp
        self.secret = tmp / "secret"
        self.secret.write_text(SECRET)

    def context(self, dockerfile: str) -> Path:
        context = self.tmp / f"context-{secrets.token_hex(4)}"
        context.mkdir()
        (context / "Dockerfile").write_text(dockerfile.format(base=self.image))
        return context

    def log_offset(self) -> int:
        return self.containerd.log_path.stat().st_size

    def steps_since(self, offset: int) -> dict[str, str]:
        with self.containerd.log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return dict(CREATED.findall(text))

    def build(self, context: Path, image: str | None = None) -> Build:
        offset = self.log_offset()
        output = None if image is None else f"{image},unpack=true"
        result = self.buildkitd.build(context, image=output, secrets={"s": self.secret})
        return Build(result.returncode, result.stderr, self.steps_since(offset))

    def leftovers(self, steps: dict[str, str]) -> list[str]:
        """What the steps' containers left: theirs (a VM, its state, share, socket,
        netns), a root filesystem buildkitd mounted for them. In cni mode buildkitd keeps
        a step's network namespace (and its veth) for 5 minutes, for its next steps
        (its netpool's grace period, even with cniPoolSize 0): that one is buildkitd's,
        and the module's teardown checks it is gone when buildkitd stops."""
        found = [item for step in steps for item in leftovers(self.containerd, step)]
        scratch = self.buildkitd.layout.tmp
        return found + [f"mount {m}" for m in linux.mounts_under(str(scratch))]

    def default_address(self) -> str:
        """The address a step has on buildkitd's default network, as `ip -o -4 addr`
        prints it: gvproxy's guest (host mode), the bridge's first lease (cni mode)."""
        if self.buildkitd.cni is None:
            return "inet 192.168.127.2/24"
        subnet = ipaddress.ip_network(self.buildkitd.cni.subnet)
        return f"inet {subnet[2]}/{subnet.prefixlen}"


@pytest.fixture(scope="module", params=["host", "cni"])
def builder(
    usable_flavour: Flavour,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Builder]:
    """The module's buildkitd, in each network mode: "host" (a step shares the host's
    network: gvproxy's under harpoon) and "cni" (a namespace of its own on a bridge)."""
    if usable_flavour.name != "2.3":
        pytest.skip("BuildKit's containerd worker is tested on containerd 2.3")
    if BUILDKIT.missing_binaries():
        unavailable(f"buildkitd is not built: {BUILDKIT.install_hint()}")
    containerd_session: Containerd = request.getfixturevalue("containerd_session")
    busybox_image: str = request.getfixturevalue("busybox_image")
    if TemplateStore.from_environment() is not None:
        # Both plain layouts' templates (the host's network: host mode's steps; a
        # network namespace: cni mode's and --network=none), as install-deps leaves
        # them; at once if they exist.
        subprocess.run(
            [sys.executable, "-m", "harpoon.cli", "template", "build"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
    log_dir = containerd_session.log_path.parent
    buildkitd = Buildkitd(containerd_session, network=request.param, log_dir=log_dir)
    try:
        yield Builder(buildkitd.start(), busybox_image, tmp_path_factory.mktemp("buildkit"))
    finally:
        left = buildkitd.stop()
    assert left == [], f"buildkitd left mounts behind when it stopped: {left}"
    if buildkitd.cni is not None:
        assert not Path("/sys/class/net", buildkitd.cni.bridge).exists()


MULTI_STAGE = """\
FROM {base} AS build
RUN --network=none ip -o link > /links-none
RUN ip -o -4 addr > /addresses && echo {token} > /token
RUN --mount=type=secret,id=s sha256sum < /run/secrets/s > /secret-sum
FROM {base}
COPY --from=build /links-none /addresses /secret-sum /token /built/
"""


@dataclass(frozen=True)
class MultiStage:
    context: Path
    image: str
    first: Build
    token: str


@pytest.fixture(scope="module")
def multi_stage(builder: Builder) -> Iterator[MultiStage]:
    token = secrets.token_hex(6)
    image = f"docker.io/library/hp-built-{token}:latest"
    context = builder.context(MULTI_STAGE.replace("{token}", token))
    try:
        yield MultiStage(context, image, builder.build(context, image), token)
    finally:
        builder.containerd.ctr("image", "rm", image, check=False)


def test_a_multi_stage_build_with_a_secret_runs_under_harpoon(
    multi_stage: MultiStage, builder: Builder, containerd: Containerd, container_id: str
) -> None:
    assert multi_stage.first.status == 0, multi_stage.first.progress
    run = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, multi_stage.image, container_id,
        "sh", "-c", "cat /built/token /built/secret-sum; cat /built/links-none /built/addresses",
        timeout=180,
    )  # fmt: skip
    token, secret_sum, *network = run.stdout.splitlines()
    assert token == multi_stage.token
    # The secret was at /run/secrets/s in its step.
    assert secret_sum == f"{hashlib.sha256(SECRET.encode()).hexdigest()}  -"
    # --network=none: a namespace with its loopback alone.
    links = [line.split(": ")[1] for line in network if " link/" in line]
    assert links == ["lo"]
    # The default network: the host's under harpoon, gvproxy's (host mode), or the
    # bridge's (cni mode).
    assert any(f" {builder.default_address()} " in line for line in network), network
    assert builder.leftovers(multi_stage.first.steps) == []


def test_each_run_step_ran_in_a_vm_restored_from_a_template(
    multi_stage: MultiStage, containerd: Containerd
) -> None:
    if TemplateStore.from_environment() is None:
        pytest.skip("VM templates are turned off ($HARPOON_TEMPLATES)")
    assert multi_stage.first.status == 0, multi_stage.first.progress
    # Three RUN steps, three containers of harpoon's, each VM restored.
    assert list(multi_stage.first.steps.values()) == ["restored"] * 3


def test_a_second_identical_build_runs_no_step(
    multi_stage: MultiStage, builder: Builder, containerd: Containerd
) -> None:
    assert multi_stage.first.status == 0, multi_stage.first.progress
    again = builder.build(multi_stage.context, multi_stage.image)
    assert again.status == 0, again.progress
    assert again.steps == {}  # no VM started
    runs = [line for line in again.progress.splitlines() if re.match(r"#\d+ \[.*\] RUN ", line)]
    assert len(runs) == 3
    for line in runs:
        number = line.split()[0]
        assert f"{number} CACHED" in again.progress, line


def test_a_failing_step_fails_the_build_and_leaves_nothing(
    builder: Builder, containerd: Containerd
) -> None:
    token = secrets.token_hex(6)
    context = builder.context(f"FROM {{base}}\nRUN echo {token} > /a\nRUN false\n")
    build = builder.build(context)
    assert build.status != 0
    assert "did not complete successfully: exit code: 1" in build.progress
    assert len(build.steps) == 2
    assert builder.leftovers(build.steps) == []


def test_a_build_interrupted_mid_run_leaves_nothing(
    builder: Builder, containerd: Containerd
) -> None:
    """SIGINT to buildctl while a RUN step sleeps (a user's ^C): the build is cancelled,
    and buildkitd kills and deletes the step's container, whose VM goes with it."""
    token = secrets.token_hex(6)
    context = builder.context(f"FROM {{base}}\nRUN echo {token} && sleep 30\n")
    offset = builder.log_offset()
    buildctl = subprocess.Popen(
        builder.buildkitd.build_command(context, secrets={"s": builder.secret}),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STEP_START_TIMEOUT_S
        while not builder.steps_since(offset):
            assert buildctl.poll() is None, buildctl.communicate()[0].decode()
            assert time.monotonic() < deadline, "the RUN step never started"
            time.sleep(POLL_INTERVAL_S)
        buildctl.send_signal(signal.SIGINT)
        progress = buildctl.communicate(timeout=BUILD_TIMEOUT_S)[0].decode(errors="replace")
    finally:
        if buildctl.poll() is None:
            buildctl.kill()
            buildctl.wait()
    assert buildctl.returncode != 0, progress
    assert "canceled" in progress, progress
    steps = builder.steps_since(offset)
    assert len(steps) == 1
    # buildkitd deletes the cancelled step's container after buildctl has gone.
    deadline = time.monotonic() + CLEAN_UP_TIMEOUT_S
    while containerd.containers() or builder.leftovers(steps):
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    assert builder.leftovers(steps) == []
