"""The front door, through the `harpoon` command alone: `harpoon system start`, nerdctl's
commands on harpoon's own containerd, `harpoon doctor`, and `harpoon system stop` after
a crash.

One `harpoon system start` per module, under a temporary HARPOON_ROOT (its containerd,
nerdctl state, CNI network and VMs' run directory are the session's own:
tests/e2e/front_door.py); the busybox image built by harpoon.devenv.images goes in with
`harpoon load`. Each case
runs under harpoon and, where the result should match, under runc on the same services
(`--runtime io.containerd.runc.v2`, which the front door must leave the user's).
Containers run on harpoon's default network (nerdctl's "bridge" on harpoon's bridge).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.devenv.cni import a_free_subnet, bridge_named, forget
from harpoon.devenv.debian_image import DEBIAN_WEB_REF, build_debian_image
from harpoon.devenv.images import default_cache_dir
from harpoon.devenv.registry import Registry
from tests.e2e.differential import HARPOON, RUNC
from tests.e2e.front_door import (
    IMAGE,
    POLL_INTERVAL_S,
    SYSTEM_TIMEOUT_S,
    Done,
    Harpoon,
    free_port,
    harpoon_on_new_root,
    leftovers,
    services_on_new_root,
    start_system,
    stop_system,
)

#: How many times a published port is asked before the test gives up (~30 s).
HTTPD_ATTEMPTS = 300
#: The 3-service app of test_nerdctl_compose.py.
COMPOSE_APP = Path(__file__).parent / "compose_app"
HTTPD = (
    "mkdir -p /www && echo served by $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"
)


@pytest.fixture(scope="module")
def harpoon() -> Iterator[Harpoon]:
    yield from services_on_new_root()


@pytest.fixture
def clean(harpoon: Harpoon) -> Iterator[Harpoon]:
    """The module's harpoon; the test must leave no container or volume."""
    yield harpoon
    containers = harpoon.check("ps", "-a", "-q").split()
    volumes = harpoon.check("volume", "ls", "-q").split()
    if containers:
        harpoon("rm", "-f", *containers)
    if volumes:
        harpoon("volume", "rm", *volumes)
    assert not containers and not volumes, f"left: {containers} {volumes}"


RUNTIMES = pytest.mark.parametrize("runtime", [HARPOON, RUNC])


def runtime_args(runtime: str) -> list[str]:
    """Nothing for harpoon (the front door's default), --runtime for runc."""
    return [] if runtime == HARPOON else ["--runtime", runtime]


@RUNTIMES
def test_run_rm_echo(clean: Harpoon, runtime: str) -> None:
    done = clean("run", "--rm", "--pull", "never", *runtime_args(runtime), IMAGE, "echo", "hi")
    assert (done.status, done.out, done.err) == (0, "hi\n", "")


def test_harpoon_is_the_default_runtime_and_runc_can_be_asked_for(clean: Harpoon) -> None:
    """The guest's kernel is not the host's: harpoon ran the first, runc the second."""
    host = os.uname().release
    under_harpoon = clean.check("run", "--rm", "--pull", "never", IMAGE, "uname", "-r")
    under_runc = clean.check("run", "--rm", "--pull", "never", "--runtime", RUNC, IMAGE,
                             "uname", "-r")  # fmt: skip
    assert under_runc.strip() == host
    assert under_harpoon.strip() != host


def lifecycle(harpoon: Harpoon, runtime: str) -> dict[str, object]:
    name = f"life-{'harpoon' if runtime == HARPOON else 'runc'}"
    facts: dict[str, object] = {}
    script = "echo started; trap 'echo stopping; exit 0' TERM; while true; do sleep 0.1; done"
    run = harpoon("run", "-d", "--name", name, "--pull", "never", *runtime_args(runtime),
                  IMAGE, "sh", "-c", script)  # fmt: skip
    facts["run -d"] = run.status
    facts["exec"] = harpoon("exec", name, "sh", "-c", "echo from exec; exit 3")
    facts["state running"] = harpoon.check("inspect", "-f", "{{.State.Status}}", name).strip()
    facts["stop"] = harpoon("stop", name).status
    facts["state stopped"] = harpoon.check("inspect", "-f", "{{.State.Status}}", name).strip()
    facts["logs after stop"] = harpoon.check("logs", name)
    facts["start"] = harpoon("start", name).status
    facts["exec after start"] = harpoon.check("exec", name, "echo", "again")
    facts["rm -f"] = harpoon("rm", "-f", name).status
    facts["gone"] = harpoon("inspect", name).status != 0
    return facts


def test_run_d_exec_logs_stop_start_rm_under_harpoon_match_runc(clean: Harpoon) -> None:
    runc = lifecycle(clean, RUNC)
    assert runc == {
        "run -d": 0, "state running": "running",
        "exec": Done(1, "from exec\n", 'level=fatal msg="exec failed with exit code 3"\n'),
        "stop": 0, "state stopped": "exited", "logs after stop": "started\nstopping\n",
        "start": 0, "exec after start": "again\n", "rm -f": 0, "gone": True,
    }, "runc, the oracle, changed"  # fmt: skip
    assert lifecycle(clean, HARPOON) == runc


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def fetch_once_served(port: int) -> str | None:
    """GET / of 127.0.0.1:port once something serves it there (None if nothing did
    within HTTPD_ATTEMPTS tries)."""
    for _ in range(HTTPD_ATTEMPTS):
        try:
            return fetch(f"http://127.0.0.1:{port}/")
        except OSError:
            time.sleep(POLL_INTERVAL_S)
    return None


@RUNTIMES
def test_published_port_serves_from_busybox_httpd(clean: Harpoon, runtime: str) -> None:
    port = free_port()
    publish = ["-p", f"127.0.0.1:{port}:80"]
    clean.check("run", "-d", "--name", "web", "--hostname", "web", "--pull", "never",
                *publish, *runtime_args(runtime), IMAGE, "sh", "-c", HTTPD)  # fmt: skip
    try:
        # `run -d` returns once the task runs; httpd listens right after: ask until then.
        assert fetch_once_served(port) == "served by web\n"
        assert clean.check("port", "web").strip() == f"80/tcp -> 127.0.0.1:{port}"
    finally:
        clean.check("rm", "-f", "web")


@RUNTIMES
def test_bind_mount_of_a_host_directory(clean: Harpoon, runtime: str, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from the host\n")
    done = clean("run", "--rm", "--pull", "never", "-v", f"{tmp_path}:/data",
                 *runtime_args(runtime), IMAGE, "sh", "-c",
                 "cat /data/in.txt && echo from the container > /data/out.txt")  # fmt: skip
    assert (done.status, done.out, done.err) == (0, "from the host\n", "")
    assert (tmp_path / "out.txt").read_text() == "from the container\n"


@RUNTIMES
def test_named_volume_outlives_its_container(clean: Harpoon, runtime: str) -> None:
    clean.check("volume", "create", "kept")
    args = ["--pull", "never", "-v", "kept:/data", *runtime_args(runtime), IMAGE]
    clean.check("run", "--rm", *args, "sh", "-c", "echo kept in the volume > /data/file")
    assert clean.check("run", "--rm", *args, "cat", "/data/file") == "kept in the volume\n"
    mountpoint = clean.check("volume", "inspect", "-f", "{{.Mountpoint}}", "kept").strip()
    assert mountpoint.startswith(f"{clean.root}/lib/nerdctl/")
    assert Path(mountpoint, "file").read_text() == "kept in the volume\n"
    clean.check("volume", "rm", "kept")


@RUNTIMES
def test_inspect_shows_the_containers_own_address(clean: Harpoon, runtime: str) -> None:
    clean.check("run", "-d", "--name", "addr", "--pull", "never", *runtime_args(runtime),
                IMAGE, "sleep", "600")  # fmt: skip
    try:
        address = clean.check("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "addr").strip()
        inside = clean.check("exec", "addr", "ip", "-o", "-4", "addr", "show", "eth0")
    finally:
        clean.check("rm", "-f", "addr")
    chosen = clean.default_network()
    assert ipaddress.IPv4Address(address) in chosen.subnet
    assert f" {address}/{chosen.subnet.prefixlen} " in inside
    assert chosen.bridge != "nerdctl0"


@RUNTIMES
def test_stats_reports_the_container(clean: Harpoon, runtime: str) -> None:
    clean.check("run", "-d", "--name", "measured", "--pull", "never", *runtime_args(runtime),
                IMAGE, "sleep", "600")  # fmt: skip
    try:
        done = clean("stats", "--no-stream", "--format", "{{json .}}", "measured")
    finally:
        clean.check("rm", "-f", "measured")
    assert done.status == 0, done.err
    stats = json.loads(done.out)
    assert stats["Name"] == "measured" and stats["PIDs"] == "1"
    # No memory limit: runc's is the host's memory, harpoon's the VM's (not 0).
    limit = stats["MemUsage"].split("/")[1].strip()
    assert limit != "0B" and float(re.sub(r"[A-Za-z]+$", "", limit)) > 0, stats["MemUsage"]


def test_top_lists_the_processes_inside_the_vm_by_the_containers_name(clean: Harpoon) -> None:
    """`harpoon top NAME` (not nerdctl's, which would list QEMU): the container's own
    pids; a runc container's top says it does not run under harpoon."""
    script = "sleep 1001 & exec sleep 1002"
    for name, runtime in (("topped", HARPOON), ("topped-runc", RUNC)):
        clean.check("run", "-d", "--name", name, "--pull", "never", *runtime_args(runtime),
                    IMAGE, "sh", "-c", script)  # fmt: skip
    try:
        listed = clean("top", "topped")
        under_runc = clean("top", "topped-runc")
    finally:
        clean.check("rm", "-f", "topped", "topped-runc")
    assert listed.status == 0, listed.err
    rows = [line.split(None, 7) for line in listed.out.splitlines()[1:]]
    assert [(r[0], r[1], r[2], r[7]) for r in rows] == [
        ("root", "1", "0", "sleep 1002"), ("root", rows[1][1], "1", "sleep 1001"),
    ]  # fmt: skip
    assert under_runc.status == 1 and "does not run under harpoon" in under_runc.err


@pytest.mark.parametrize("image", ["busybox", "debian-web"])
def test_images_pushed_to_and_pulled_from_a_local_registry(
    clean: Harpoon, registry: Registry, image: str
) -> None:
    """`harpoon tag`, `push` to the registry on 127.0.0.1, `rmi`, `pull` back, `run`:
    the busybox image and the Debian one (nginx, python3), both built here."""
    if image == "busybox":
        local, command = IMAGE, ["echo", "pulled"]
    else:
        clean.check("load", "-i", str(build_debian_image(default_cache_dir())))
        local, command = DEBIAN_WEB_REF, ["python3", "-c", "print('pulled')"]
    remote = f"{registry.host}/front-door/{image}:pushed"
    clean.check("tag", local, remote)
    clean.check("push", "--insecure-registry", remote)
    clean.check("rmi", remote)
    assert remote not in clean.check("images", "--format", "{{.Repository}}:{{.Tag}}")
    clean.check("pull", "--insecure-registry", remote)
    try:
        done = clean("run", "--rm", remote, *command)
    finally:
        clean.check("rmi", remote)
    assert (done.status, done.out, done.err) == (0, "pulled\n", "")


def vm_leftovers(harpoon: Harpoon) -> list[str]:
    """The VMs' state directories, shares and network namespaces under the root."""
    return [str(p) for d in ("vm", "share", "netns") for p in (harpoon.run_dir / d).glob("*")]


def test_compose_runs_every_service_in_a_vm(clean: Harpoon, tmp_path: Path) -> None:
    """`harpoon compose up -d` of the 3-service app (tests/e2e/compose_app), no service
    naming a runtime: each runs under harpoon (its `harpoon top` answers); the app
    reaches web and store by name; `down` leaves no VM, share or netns, the volume's
    count survives it into a second `up`; `down -v` leaves no container or volume."""
    image_tar = build_debian_image(default_cache_dir())
    clean.check("load", "-i", str(image_tar))
    project, port = f"fdapp{os.getpid() % 10000}", free_port()
    shutil.copytree(COMPOSE_APP, tmp_path / project)
    env = {**clean.env, "HPT_IMAGE": DEBIAN_WEB_REF, "HPT_RUNTIME": "", "HPT_PORT": str(port),
           "HPT_SUBNET": str(a_free_subnet())}  # fmt: skip
    compose = Harpoon(clean.root, env)
    compose_file = str(tmp_path / project / "compose.yaml")
    network, bridge = f"{project}_default", None
    up = compose("compose", "-f", compose_file, "up", "-d")
    try:
        assert up.status == 0, f"{up.err}\ncontainerd's log: {clean.log_tail()}"
        answer = fetch_once_served(port)
        names = sorted(compose.check("ps", "--format", "{{.Names}}").split())
        tops = {name: compose("top", name).status for name in names}
        bridge = bridge_named(clean.root / "lib" / "cni" / "net.d", network)
        down = compose("compose", "-f", compose_file, "down")
        after_down = vm_leftovers(clean)
        again = compose("compose", "-f", compose_file, "up", "-d")
        answer_again = fetch_once_served(port)
    finally:
        down_v = compose("compose", "-f", compose_file, "down", "-v")
        leaks = forget(network, bridge) if bridge else [f"no bridge found for {network}"]
    assert answer == "hello from web (visit 1)\n"
    assert names == [f"{project}-{service}-1" for service in ("app", "store", "web")]
    assert tops == dict.fromkeys(names, 0), "a service did not run under harpoon"
    assert (down.status, after_down) == (0, []), down.err
    assert again.status == 0, again.err
    assert answer_again == "hello from web (visit 2)\n", "the volume's count did not survive"
    assert down_v.status == 0, down_v.err
    assert vm_leftovers(clean) == []
    assert leaks == [], "compose down left these of its network"


def test_system_status_names_each_service_its_socket_and_log(harpoon: Harpoon) -> None:
    out = harpoon.check("system", "status")
    pids = [line.split("pid=")[1].split()[0] for line in out.splitlines()]
    assert out == (
        f"containerd pid={pids[0]} healthy "
        f"socket={harpoon.run_dir}/containerd/containerd.sock "
        f"log={harpoon.root}/lib/log/containerd.log\n"
        f"buildkitd pid={pids[1]} healthy "
        f"socket={harpoon.run_dir}/buildkit/buildkitd.sock "
        f"log={harpoon.root}/lib/log/buildkitd.log\n"
    )


def test_doctor_with_nerdctl_hidden_names_it_and_the_fix(harpoon: Harpoon) -> None:
    env = dict(harpoon.env, HARPOON_NERDCTL="/nonexistent/nerdctl")
    done = Harpoon(harpoon.root, env)("doctor")
    assert done.status == 1
    (line,) = [line for line in done.out.splitlines() if "nerdctl" in line]
    assert line == (
        "MISSING  nerdctl: no nerdctl ($HARPOON_NERDCTL, built or on PATH); "
        "fix: bash scripts/install-deps (builds nerdctl v2.3.5)"
    )


def test_doctor_with_cni_plugins_hidden_names_them(harpoon: Harpoon, tmp_path: Path) -> None:
    env = dict(harpoon.env, HARPOON_CNI_PATH=str(tmp_path))
    done = Harpoon(harpoon.root, env)("doctor")
    assert done.status == 1
    assert (
        f"MISSING  CNI plugins: no bridge, portmap, firewall, tuning, host-local, loopback in "
        f"{tmp_path}; fix: apt-get install containernetworking-plugins"
    ) in done.out.splitlines()


def test_system_stop_after_containerd_was_killed_leaves_nothing() -> None:
    """A root of its own: containerd SIGKILLed while a container runs in a VM with a
    published port; `system stop` leaves no VM, shim, mount, netns, socket, pid file,
    bridge; `system start` then starts on it again and the container can be removed."""
    harpoon = harpoon_on_new_root()
    try:
        start_system(harpoon)
        port = free_port()
        harpoon.check("run", "-d", "--name", "crashed", "--pull", "never",
                      "-p", f"127.0.0.1:{port}:80", IMAGE, "sleep", "600")  # fmt: skip
        pid = int((harpoon.run_dir / "services" / "containerd.pid").read_text().split()[0])
        os.kill(pid, 9)
        assert harpoon("system", "status").status == 3
        assert any("qemu" in line for line in leftovers(harpoon)), "no VM ran: no test"
        harpoon.check("system", "stop", timeout=SYSTEM_TIMEOUT_S)
        assert leftovers(harpoon) == []
        harpoon.check("system", "start", timeout=SYSTEM_TIMEOUT_S)
        listed = harpoon.check("ps", "-a", "--format", "{{.Names}} {{.Status}}").split("\n")
        assert listed[0].split()[0] == "crashed" and "Up" not in listed[0]
        harpoon.check("rm", "-f", "crashed")
    finally:
        left = stop_system(harpoon)
    assert left == []
