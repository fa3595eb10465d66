"""buildkitd as harpoon's second service: what `harpoon build` runs on.

It is harpoon.buildkit's buildkitd (its containerd worker alone, runtime
io.containerd.harpoon.v1: every RUN step in a VM), on harpoon's containerd, with its
files under harpoon's layout (`Layout.buildkitd`: its cache in <state>/buildkit, its
buildkitd.toml, sockets, pid file and TMPDIR in <run>/buildkit, its log in
<state>/log/buildkitd.log). It starts after containerd and stops before it.

**Its own containerd namespace** (`BUILDKIT_NAMESPACE`), not harpoon's. BuildKit labels
none of its step containers, and a buildkitd that is killed mid-RUN leaves its step's
container and task in containerd, the task's VM running on. In a namespace where
nothing else lives, every container that no running buildkitd owns is such a leftover:
`shut_down` and `launch` delete them all (harpoon.system.cleanup.release_step_containers:
kill, delete task, delete container; the shim tears the VM down), with no guess about
which of the user's containers are steps. Two consequences:

- The built image reaches harpoon's namespace through nerdctl: nerdctl v2.3.5's build
  (pkg/cmd/builder/build.go, `generateBuildctlArgs` and `isImageSharable`) asks
  buildctl for `--output type=image,unpack=true` only when the worker's containerd
  namespace is nerdctl's; here it is not, so it asks for `type=docker` and loads the
  tarball buildctl writes to its stdout into its own namespace (`loadImage`: import and
  unpack), then tags the other `-t` names.
- A `FROM` of an image in harpoon's namespace (loaded, pulled or built before, as
  Docker's build would use) must be visible to the worker: BuildKit's image source
  falls back to the worker's own image store when the registry cannot answer
  (source/containerimage/source.go, ResolveModeDefault). `share_images` mirrors
  harpoon's images into the build namespace before each build, by name and digest:
  `ctr images export | ctr images import --no-unpack` for what differs (the content
  store is shared between namespaces, so a blob already there is not stored twice), and
  names gone from harpoon's namespace are dropped from the mirror.

**Network mode: host.** A RUN step then has no network namespace, so harpoon gives its
VM a gvproxy of its own (README, "Networks"): NAT to the outside, the host's 127.0.0.1
at 192.168.127.254, started with the VM and gone with it. Nothing of a step's network
outlives the step, nothing is shared between builds, and nothing has to be chosen to
keep clear of harpoon's default network (harpoon0) or nerdctl's (nerdctl0). CNI mode
would need a second bridge and subnet of its own and iptables rules, and buildkitd keeps
each CNI step's namespace and veth for minutes after the step (its pool's grace period,
even with cniPoolSize 0), which a killed buildkitd leaves behind. `RUN --network=none` is
a namespace with its loopback alone in either mode. The cost of host mode: a port a RUN
step listens on at a wildcard address is published on the host's 127.0.0.1 while the
step runs (gvproxy's rule for a host-network VM).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from harpoon.buildkit.config import BuildkitdSettings
from harpoon.buildkit.daemon import (
    BuildkitBinaries,
    BuildkitdError,
    running_pid,
    start_buildkitd,
    stop_buildkitd,
)
from harpoon.system import cleanup, config
from harpoon.system.layout import BUILDKIT_NAMESPACE, NAMESPACE, SNAPSHOTTER, Layout
from harpoon.system.services import Service, ServiceError, accepts

NAME = "buildkitd"
#: The label of an image copied into the build namespace: its original's digest.
SHARED_FROM_LABEL = "io.harpoon.shared-from"
#: How long one image may take to cross into the build namespace (export | import).
SHARE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class BuildkitdService(Service):
    """buildkitd, started and stopped by harpoon.buildkit.daemon (its pid file, its
    readiness: `buildctl debug workers`, its clean-up after a kill)."""

    layout: Layout = field(kw_only=True, repr=False)
    choice: config.ContainerdChoice = field(kw_only=True, repr=False)
    binaries: BuildkitBinaries = field(kw_only=True, repr=False)

    def settings(self) -> BuildkitdSettings:
        return BuildkitdSettings(
            containerd_address=self.layout.containerd_socket,
            namespace=BUILDKIT_NAMESPACE,
            snapshotter=SNAPSHOTTER,
            network="host",
        )

    def pid(self) -> int | None:
        return running_pid(self.layout.buildkitd)

    def launch(self) -> int:
        # No buildkitd runs: every step container in its namespace is a leftover.
        cleanup.release_step_containers(self.layout, self.choice)
        try:
            return start_buildkitd(self.binaries, self.settings(), self.layout.buildkitd, self.log)
        except BuildkitdError as error:
            raise ServiceError(str(error)) from error

    def shut_down(self, progress: Callable[[str], None]) -> None:
        pid = self.pid()
        if pid is not None:
            progress(f"stopping {self.name} (pid {pid})")
        stop_buildkitd(self.layout.buildkitd)
        # Without containerd, cleanup.after_stop deletes the steps' tasks by their
        # bundles, and the next launch their containers.
        if accepts(self.layout.containerd_socket):
            for step in cleanup.release_step_containers(self.layout, self.choice):
                progress(f"deleted {step}")


def service(
    layout: Layout, choice: config.ContainerdChoice, binaries: BuildkitBinaries
) -> BuildkitdService:
    bk = layout.buildkitd
    return BuildkitdService(
        name=NAME,
        argv=(str(binaries.buildkitd), "--config", str(bk.config)),
        env={},
        socket=bk.socket,
        log=layout.log_file(NAME),
        pid_file=bk.pid_file,
        origin=f"buildkitd at {binaries.buildkitd} (namespace {BUILDKIT_NAMESPACE})",
        on_demand=True,
        layout=layout,
        choice=choice,
        binaries=binaries,
    )


def binaries() -> BuildkitBinaries:
    found = config.find_buildkit()
    if isinstance(found, str):
        raise ServiceError(
            f"{found}: `harpoon build` needs buildkitd and buildctl; run "
            "`bash scripts/install-deps` (builds BuildKit v0.32.2)"
        )
    return found


def build_environment(
    layout: Layout, found: BuildkitBinaries, env: Mapping[str, str]
) -> dict[str, str]:
    """nerdctl build's environment: buildctl first on PATH (nerdctl runs the one PATH
    names), BUILDKIT_HOST harpoon's buildkitd (a `--buildkit-host` still wins)."""
    path = os.pathsep.join(p for p in (str(found.buildctl.parent), env.get("PATH")) if p)
    return {**env, "PATH": path, "BUILDKIT_HOST": layout.buildkitd.address}


def _images(choice: config.ContainerdChoice, layout: Layout, namespace: str) -> dict[str, str]:
    """name -> the digest of the namespace's images: harpoon's own digest, or for a copy
    in the build namespace, its original's (SHARED_FROM_LABEL: an export holds one
    platform's manifest, not the original's index)."""
    done = config.ctr(choice, layout, "images", "ls", namespace=namespace)
    if done.returncode != 0:
        raise ServiceError(f"ctr -n {namespace} images ls: {done.stderr.strip()}")
    found = {}
    for row in (line.split() for line in done.stdout.splitlines()[1:]):
        if len(row) < 3:
            continue
        labels = dict(label.partition("=")[::2] for label in row[-1].split(","))
        found[row[0]] = labels.get(SHARED_FROM_LABEL, row[2])
    return found


def share_images(layout: Layout, progress: Callable[[str], None] = lambda _: None) -> list[str]:
    """Mirrors harpoon's images into the build namespace (the module's docstring says
    why); returns the names it copied or dropped."""
    choice = config.find_containerd()
    if isinstance(choice, str):
        raise ServiceError(choice)
    ours = _images(choice, layout, NAMESPACE)
    mirrored = _images(choice, layout, BUILDKIT_NAMESPACE)
    changed = []
    stale = [name for name, digest in mirrored.items() if ours.get(name) != digest]
    if stale:
        config.ctr(choice, layout, "images", "rm", *stale, namespace=BUILDKIT_NAMESPACE)
        changed += stale
    for name, digest in ours.items():
        if mirrored.get(name) == digest:
            continue
        progress(f"sharing {name} with the builder")
        try:
            _copy_image(choice, layout, name, digest)
        except ServiceError as error:  # a FROM of it fails; the other images are shared
            progress(str(error))
            continue
        changed.append(name)
    return changed


def _copy_image(choice: config.ContainerdChoice, layout: Layout, name: str, digest: str) -> None:
    # --local: through the transfer API, an import from a pipe cut blobs short here
    # ("short read … unexpected EOF", 1 run in 2).
    env = config.ctr_environment(choice)
    export = subprocess.Popen(
        config.ctr_argv(choice, layout, NAMESPACE, "images", "export", "--local", "-", name),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert export.stdout is not None
    label = f"{SHARED_FROM_LABEL}={digest}"
    with export.stdout:
        imported = subprocess.run(
            config.ctr_argv(choice, layout, BUILDKIT_NAMESPACE, "images", "import",
                            "--local", "--no-unpack", "--label", label, "-"),
            stdin=export.stdout, capture_output=True, text=True, timeout=SHARE_TIMEOUT_S,
            check=False, env=env,
        )  # fmt: skip
    export_err = export.communicate(timeout=SHARE_TIMEOUT_S)[1].decode(errors="replace")
    if export.returncode != 0 or imported.returncode != 0:
        said = [line for line in (export_err + imported.stderr).splitlines()
                if "level=warning" not in line]  # fmt: skip
        raise ServiceError(f"sharing {name} with the builder: {' '.join(said)}")
