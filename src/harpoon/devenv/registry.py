"""A local image registry for the tests: Debian's `docker-registry` (the CNCF
distribution registry, v2.8), on 127.0.0.1 only, its storage in a directory of its own.

Debian's package would run the registry as a service on every address (`:5000`) with
its blobs in /var/lib/docker-registry and an htpasswd realm; the config written here has
none of that: plain HTTP on the loopback (clients treat 127.0.0.1 as an insecure
registry, as Docker does, when told `--insecure-registry`), no auth, deletes allowed,
no storage health check. Ready once `GET /v2/` answers 200 (the API's version check).
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.1


class RegistryError(RuntimeError):
    """The registry could not start; says why (its log's tail)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def render_config(storage: Path, port: int) -> str:
    return (
        "version: 0.1\n"
        "log:\n  level: info\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {storage}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {LOOPBACK}:{port}\n"
    )


class Registry:
    """One registry process; `with Registry() as r:` starts it and stops it and removes
    its directory at the end. `r.host` is `127.0.0.1:PORT`, for image references."""

    def __init__(self, binary: Path = REGISTRY_BINARY) -> None:
        self.binary = binary
        self.base = Path(tempfile.mkdtemp(prefix="hp-registry-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "registry.log"

    def start(self) -> Registry:
        if not self.binary.exists():
            raise RegistryError(f"{self.binary} is missing: apt-get install docker-registry")
        self.port = _free_port()
        config = self.base / "config.yml"
        config.write_text(render_config(self.base / "storage", self.port))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "serve", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RegistryError(f"docker-registry on {self.host} did not start: {tail}")
            time.sleep(POLL_INTERVAL_S)
        return self

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            connection.request("GET", "/v2/")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
