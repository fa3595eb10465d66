"""nerdctl driving the session's containerd for the e2e tests, offline, with nothing of
it outside a temporary directory: harpoon.devenv.nerdctl's setup (its docstring says what
that takes), plus what the tests run with it.

The busybox image imported by `ctr` is found by its name (`busybox_image`); `--net
none` is `run_args`' default, so no CNI plugin runs unless a test names a network (the
nerdctl fixture skips on containerd 1.6: nerdctl 2.3 needs 1.7).

`--rm` runs remove their container; the fixture removes every container (`nerdctl rm
-f`) and volume (`nerdctl volume rm`) a test leaves before the `containerd` fixture's
leak check.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harpoon.devenv.nerdctl import COMMAND_TIMEOUT_S, OfflineNerdctl
from tests.e2e.differential import CTR_RUN_TIMEOUT_S, Result, normalised


@dataclass
class Nerdctl(OfflineNerdctl):
    """The session's nerdctl and the image its tests run."""

    image: str

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT_S
    ) -> Result:
        """Runs `nerdctl ARGS`; its output without nerdctl's own `level=warning` lines."""
        proc = subprocess.run(
            self.command(*args), input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, timeout=timeout, env=self.environment(), check=False,
        )  # fmt: skip
        return result(proc.returncode, proc.stdout, proc.stderr)

    def check(self, *args: str) -> str:
        """`nerdctl ARGS`, which must succeed; its stdout."""
        done = self(*args)
        assert done.status == 0, f"nerdctl {' '.join(args)}: status {done.status}: {done.err}"
        return done.out

    def run_args(self, runtime: str, *args: str, net: str = "none") -> tuple[str, ...]:
        """`run --runtime RUNTIME --net NET --pull never ARGS` (ARGS ends with the
        command; the image is `self.image`)."""
        return ("run", "--runtime", runtime, "--net", net, "--pull", "never", *args)

    def run(
        self, runtime: str, *args: str, input: bytes | None = None, net: str = "none"
    ) -> Result:
        """`nerdctl run` (`run_args`) to its end (for `-d`, until the container runs)."""
        return self(*self.run_args(runtime, *args, net=net), input=input, timeout=CTR_RUN_TIMEOUT_S)

    def start(self, runtime: str, *args: str, net: str = "none") -> subprocess.Popen[bytes]:
        """`nerdctl run` (`run_args`) in the background, its output in pipes; pass what
        it gave to `result`."""
        return subprocess.Popen(
            self.command(*self.run_args(runtime, *args, net=net)), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.environment(),
        )  # fmt: skip

    def volume_path(self, name: str) -> Path:
        """The host directory of a named volume."""
        return Path(self.check("volume", "inspect", "--format", "{{.Mountpoint}}", name).strip())

    def containers(self) -> list[str]:
        """IDs of every container in the namespace, running or not."""
        return self.check("ps", "--all", "--quiet", "--no-trunc").split()

    def volumes(self) -> list[str]:
        return self.check("volume", "ls", "--quiet").split()

    def remove_all(self) -> list[str]:
        """Removes every container (`rm -f`) and volume; returns what there was."""
        containers, volumes = self.containers(), self.volumes()
        if containers:
            self.check("rm", "--force", *containers)
        if volumes:
            self.check("volume", "rm", *volumes)
        return [*containers, *(f"volume {name}" for name in volumes)]


#: nerdctl run forwards every signal it gets (Go's runtime sends itself SIGURG) to its
#: task until the task is gone, and logs a Kill that loses the race with the task's
#: deletion: "forward signal child exited" with ttrpc's "closed" under runc's shim too.
FORWARD_SIGNAL_RACE = re.compile(rb'^time="[^"]*" level=error msg="forward signal .*\n?', re.M)


def result(status: int, stdout: bytes, stderr: bytes) -> Result:
    """A nerdctl command's outcome, without nerdctl's own `level=warning` lines nor its
    racy signal-forwarding errors (FORWARD_SIGNAL_RACE)."""
    return Result(
        status, normalised(stdout, ""), normalised(FORWARD_SIGNAL_RACE.sub(b"", stderr), "")
    )
