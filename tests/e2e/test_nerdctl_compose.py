"""`nerdctl compose` of a 3-service app (tests/e2e/compose_app: nginx, a Python app that
reaches it and a store by service name, the store's count in a named volume) under
harpoon, against runc: up, requests, ps, logs -f, exec, restart, down, up again (the
volume's data is still there), down -v. Each service runs in its own VM under harpoon;
the facts must equal runc's, taken just before on the same containerd, and nothing of
the project may be left after `down`: no container, VM, network namespace, bridge,
iptables rule or volume (after `-v`).

Every byte stays on this machine: the host talks to the app's published port on its
loopback, containers to each other on a /24 that no host address or route touches, and
names resolve from nerdctl's /etc/hosts alone (compose.yaml's `dns: 127.0.0.1`).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harpoon.devenv.cni import a_free_subnet, bridge_named, forget
from harpoon.devenv.nerdctl import COMMAND_TIMEOUT_S
from harpoon.shim import paths
from tests.e2e import cni
from tests.e2e.differential import CTR_RUN_TIMEOUT_S, HARPOON, RUNC, Result
from tests.e2e.nerdctl import Nerdctl, result
from tests.e2e.traffic import ANSWER_TIMEOUT_S, RETRY_INTERVAL_S, free_port, http_get

APP = Path(__file__).parent / "compose_app"
#: The line the app prints once it listens (`logs -f` must show it).
APP_READY = "app listening on 8000"

Facts = dict[str, object]


class Project:
    """One compose project of the app, its files copied to a directory of its own."""

    def __init__(self, nerdctl: Nerdctl, runtime: str, image: str, where: Path) -> None:
        self.nerdctl = nerdctl
        self.name = f"hpt{secrets.token_hex(3)}"
        self.port = free_port()
        self.subnet = a_free_subnet()
        self.dir = where / self.name
        self.bridge: str | None = None
        shutil.copytree(APP, self.dir)
        self.env = {
            **nerdctl.environment(), "HPT_IMAGE": image, "HPT_RUNTIME": runtime,
            "HPT_PORT": str(self.port), "HPT_SUBNET": str(self.subnet),
        }  # fmt: skip

    def command(self, *args: str) -> list[str]:
        compose_file = str(self.dir / "compose.yaml")
        return self.nerdctl.command("compose", "-f", compose_file, "-p", self.name, *args)

    def __call__(self, *args: str, timeout: float = CTR_RUN_TIMEOUT_S) -> Result:
        done = subprocess.run(
            self.command(*args), stdin=subprocess.DEVNULL, capture_output=True,
            env=self.env, timeout=timeout, check=False,
        )  # fmt: skip
        return result(done.returncode, done.stdout, done.stderr)

    def answer(self) -> str:
        """The app's first 200 answer (it may answer 502 while web or store start)."""
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            answer = http_get(self.port)
            if answer.startswith("200 ") or time.monotonic() > deadline:
                return answer
            time.sleep(RETRY_INTERVAL_S)

    def follows_logs(self, service: str, line: str) -> bool:
        """Whether `logs -f SERVICE` shows `line` and then keeps following (it is
        still running when stopped)."""
        follower = subprocess.Popen(
            self.command("logs", "-f", "--no-color", service), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, text=True,
        )  # fmt: skip
        try:
            assert follower.stdout is not None
            seen = any(line in out for out in follower.stdout)
            return seen and follower.poll() is None
        finally:
            follower.kill()
            follower.wait()

    def container_ids(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return self.nerdctl.check("ps", "-a", "-q", "--no-trunc", "--filter", label).split()

    def volumes(self) -> list[str]:
        return [v for v in self.nerdctl.volumes() if v.startswith(self.name)]

    def forget_network(self) -> list[str]:
        """What compose's `down` left of the project's network (nerdctl leaves the
        firewall plugin's isolation rules and host-local's directory, under runc too),
        removed; the leaks among it. Its bridge was read while the network existed."""
        return forget(f"{self.name}_default", self.bridge) if self.bridge else []

    def networks(self) -> list[str]:
        names = self.nerdctl.check("network", "ls", "--format", "{{.Name}}").split()
        return [n for n in names if n.startswith(self.name)]


def harpoon_leftovers(namespace: str, container_ids: list[str]) -> list[str]:
    """What harpoon still has of these containers: VM state, shares, network namespaces
    (nothing under runc either)."""
    places = (paths.vm_state_dir, paths.share_dir, paths.netns_path)
    return [
        str(path) for cid in container_ids for place in places
        if (path := place(namespace, cid)).exists()
    ]  # fmt: skip


def compose_story(project: Project) -> Facts:
    facts: Facts = {}
    ids: list[str] = []
    up = project("up", "-d")
    try:
        facts["up"] = up.status
        ids += project.container_ids()
        project.bridge = bridge_named(project.nerdctl.cni_config_dir, f"{project.name}_default")
        facts["answers"] = [project.answer(), project.answer()]
        listed = json.loads(project("ps", "--format", "json").out or "[]")
        facts["ps"] = sorted(f"{c['Service']} {c['State']}" for c in listed)
        facts["logs -f"] = project.follows_logs("app", APP_READY)
        facts["exec"] = project("exec", "-T", "store", "cat", "/data/visits").out
        facts["restart"] = project("restart", "app").status
        facts["after restart"] = project.answer()
    finally:
        down = project("down", timeout=COMMAND_TIMEOUT_S)
    facts["down"] = down.status
    facts["after down"] = {
        "containers": project.nerdctl.containers(), "networks": project.networks(),
        "volumes": [v.removeprefix(project.name) for v in project.volumes()],
        "rules naming the port": cni.port_rules([project.port]),
        "network's leaks": project.forget_network(),
    }  # fmt: skip
    again = project("up", "-d")
    try:
        facts["up again"] = again.status
        ids += project.container_ids()
        facts["answer again"] = project.answer()
    finally:
        down = project("down", "-v", timeout=COMMAND_TIMEOUT_S)
    facts["down -v"] = down.status
    facts["after down -v"] = {
        "containers": project.nerdctl.containers(), "volumes": project.volumes(),
        "networks": project.networks(), "network's leaks": project.forget_network(),
        "harpoon": harpoon_leftovers(project.nerdctl.containerd.namespace, ids),
    }  # fmt: skip
    return facts


EXPECTED: Facts = {
    "up": 0,
    "answers": ["200 hello from web (visit 1)\n", "200 hello from web (visit 2)\n"],
    "ps": ["app running", "store running", "web running"],
    "logs -f": True,
    "exec": "2",
    "restart": 0,
    "after restart": "200 hello from web (visit 3)\n",
    "down": 0,
    "after down": {
        "containers": [], "networks": [], "volumes": ["_data"], "rules naming the port": [],
        "network's leaks": [],
    },
    "up again": 0,
    "answer again": "200 hello from web (visit 4)\n",
    "down -v": 0,
    "after down -v": {
        "containers": [], "volumes": [], "networks": [], "network's leaks": [], "harpoon": [],
    },
}  # fmt: skip


@pytest.mark.vm
def test_compose_under_harpoon_matches_runc(  # runc's run is the oracle and its check
    nerdctl: Nerdctl, debian_web_image: str, tmp_path: Path
) -> None:
    runc = compose_story(Project(nerdctl, RUNC, debian_web_image, tmp_path))
    assert runc == EXPECTED, "runc, the oracle, changed"
    assert compose_story(Project(nerdctl, HARPOON, debian_web_image, tmp_path)) == runc
