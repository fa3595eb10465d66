"""A UDP echo server for containers: tests/e2e/udp_echo.go built static with the Go
toolchain install-deps provides (nerdctl is built with it), cached beside the test
images and keyed by its source and Go's version, so it is built once per machine
(~12 s) and bind-mounted into busybox containers (`-v BINARY:/udp-echo:ro`).

The build is offline (no module proxy, no toolchain download) and leaves nothing but
the binary: Go's build cache for it is a temporary directory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from harpoon.devenv.images import default_cache_dir
from harpoon.devenv.tools import go_binary
from tests.prerequisites import unavailable

SOURCE = Path(__file__).with_name("udp_echo.go")
BUILD_TIMEOUT_S = 600.0


def udp_echo_binary() -> Path:
    """The static udp-echo binary (built unless cached)."""
    go = go_binary()
    if go is None:
        unavailable("Go is not installed: run scripts/install-deps (it builds nerdctl with it)")
        raise AssertionError("unreachable")
    version = subprocess.run(
        [str(go), "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    cache = default_cache_dir()
    binary = cache / f"udp-echo-{key}"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hp-udp-echo-") as scratch:
        env = dict(
            os.environ, CGO_ENABLED="0", GO111MODULE="off", GOTOOLCHAIN="local",
            GOPROXY="off", GOCACHE=str(Path(scratch) / "cache"), GOFLAGS="",
        )  # fmt: skip
        built = Path(scratch) / "udp-echo"
        subprocess.run(
            [str(go), "build", "-trimpath", "-ldflags=-s -w", "-o", str(built), str(SOURCE)],
            env=env, check=True, capture_output=True, timeout=BUILD_TIMEOUT_S,
        )  # fmt: skip
        # Published by a rename: a concurrent test session never runs a half-copied one.
        staged = cache / f".udp-echo-{key}-{os.getpid()}"
        staged.write_bytes(built.read_bytes())
        staged.chmod(0o755)
        staged.rename(binary)
    return binary
