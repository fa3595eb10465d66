"""harpoon's services: started detached, found again by their pid files, checked by
connecting to their sockets, stopped cleanly.

A `Service` is a daemon harpoon runs for its users: its command line, environment,
the socket that answers once it is ready, its log and its pid file; how it starts,
stops and is found running are its methods (`pid`, `launch`, `shut_down`), so a daemon
with its own runner overrides them. `planned()` is the list of them, in start order:
containerd, then buildkitd if it is there (harpoon.system.buildkitd: its containerd
worker runs harpoon's runtime), started after containerd and stopped before it.
buildkitd is `on_demand`: `harpoon build` and `system start` start it, the other
commands need containerd alone (`start(names=…)`).

Each service runs in a session of its own (setsid: a ^C in the terminal that started it
does not reach it) with its output appended to its log, and outlives the `harpoon`
command that started it. Its pid file holds the pid and the process's start time (the
22nd field of /proc/PID/stat), so a pid reused by another process after a reboot or a
crash is never taken for the service, nor signalled.

`start` and `stop` hold an exclusive lock (flock on <run>/services/lock): two `harpoon
run` started together start one containerd. Readiness is a connection to the service's
socket accepted (polled while the process lives, until START_TIMEOUT_S), never a sleep;
containerd is then asked to label harpoon's namespace with its default runtime (the
label ctr and other clients that name no runtime read).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harpoon import dirs, private
from harpoon.devenv.containerd import daemon_environment
from harpoon.devenv.host import alive
from harpoon.devenv.tools import scripts_dir
from harpoon.system import config, network
from harpoon.system.layout import NAMESPACE, RUNTIME, SNAPSHOTTER, Layout

#: How long a service may take to accept a connection on its socket (containerd takes
#: 0.1-0.5 s; a loaded machine, more).
START_TIMEOUT_S = 60.0
#: How long a service gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 10.0
#: How long the running containers get to exit after SIGTERM at `stop`.
TASK_STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
CONNECT_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 30
#: The namespace label containerd clients read for the default runtime
#: (containerd's defaults.DefaultRuntimeNSLabel).
DEFAULT_RUNTIME_LABEL = "containerd.io/defaults/runtime"


class ServiceError(RuntimeError):
    """A service could not be started (the message says why and what to do)."""


@dataclass(frozen=True)
class Service:
    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(repr=False)
    socket: Path
    log: Path
    pid_file: Path
    #: What runs, in words ("containerd 2.3.7 at … (pinned, built)").
    origin: str
    #: Run once the socket answers (containerd: label the namespace).
    after_ready: Callable[[], None] | None = field(default=None, repr=False)
    #: Started only by the commands that need it (and `system start`).
    on_demand: bool = False

    def pid(self) -> int | None:
        """Its pid while it runs (from its pid file, never a reused pid)."""
        return recorded_pid(self.pid_file)

    def launch(self) -> int:
        """Starts it, once its configuration is written; its pid once it serves."""
        return spawn(self)

    def shut_down(self, progress: Callable[[str], None]) -> None:
        """Stops it if it runs (SIGTERM, then SIGKILL) and forgets its pid file."""
        pid = self.pid()
        if pid is not None:
            progress(f"stopping {self.name} (pid {pid})")
            if terminate(pid):
                progress(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s: killed")
        self.pid_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    socket: Path
    log: Path
    healthy: bool
    origin: str = ""
    on_demand: bool = False

    @property
    def ok(self) -> bool:
        """Healthy, or on demand and simply not started yet."""
        return self.healthy or (self.on_demand and self.pid is None)


# -- pid files ---------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def write_pid_file(path: Path, pid: int) -> None:
    private.directory(path.parent)
    path.write_text(f"{pid} {_start_time(pid)}\n")


def recorded_pid(path: Path) -> int | None:
    """The pid in the file if that process still runs and is the one recorded."""
    try:
        pid_text, started = path.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if alive(pid) and _start_time(pid) == started else None


# -- readiness and stopping ------------------------------------------------------------------


def accepts(path: Path) -> bool:
    """Whether something accepts a connection on the unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(CONNECT_TIMEOUT_S)
        try:
            client.connect(str(path))
        except OSError:
            return False
    return True


def wait_exit(pid: int, timeout_s: float) -> bool:
    """Waits for the process to end (its pidfd readable); True if it did in time."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(timeout_s * 1000):
            return True
    finally:
        os.close(fd)
    return not alive(pid)  # a zombie of another parent is gone for us


def terminate(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM, then SIGKILL if it has not exited in timeout_s; True if it had to be
    killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_exit(pid, timeout_s):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_exit(pid, timeout_s)
    return True


def log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError as error:
        return f"(its log {path} is unreadable: {error})"
    return f"last lines of {path}:\n" + "\n".join(lines)


# -- the services ------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Holds the services' start/stop lock."""
    private.directory(layout.services_dir)
    fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ctr(choice: config.ContainerdChoice, layout: Layout, *args: str, check: bool = True) -> str:
    done = config.ctr(choice, layout, *args)
    if check and done.returncode != 0:
        raise ServiceError(f"ctr {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def label_namespace(choice: config.ContainerdChoice, layout: Layout) -> None:
    """Creates harpoon's namespace with harpoon as its default runtime (for clients that
    name none: ctr, buildkitd's containerd worker without a runtime of its own)."""
    label = f"{DEFAULT_RUNTIME_LABEL}={RUNTIME}"
    _ctr(choice, layout, "namespaces", "create", NAMESPACE, label, check=False)
    _ctr(choice, layout, "namespaces", "label", NAMESPACE, label)


def containerd_choice() -> config.ContainerdChoice:
    choice = config.find_containerd()
    if isinstance(choice, str):
        raise ServiceError(f"{choice}; run scripts/install-deps (or see `harpoon doctor`)")
    return choice


def containerd_service(layout: Layout, choice: config.ContainerdChoice) -> Service:
    # containerd finds containerd-shim-harpoon-v1 of this Python's install first, then
    # its own runc shim; shims inherit this environment, harpoon's directories included.
    env = daemon_environment([scripts_dir(), choice.flavour.bin_dir], SNAPSHOTTER)
    root = dirs.root()
    if root is not None:
        env[dirs.ROOT_ENV] = root
    return Service(
        name="containerd",
        argv=(str(choice.flavour.containerd), "--config", str(layout.containerd_config)),
        env=env,
        socket=layout.containerd_socket,
        log=layout.log_file("containerd"),
        pid_file=layout.pid_file("containerd"),
        origin=choice.origin,
        after_ready=lambda: label_namespace(choice, layout),
    )


def planned(layout: Layout) -> list[Service]:
    """harpoon's services, in start order: containerd, then buildkitd if it is there
    (`harpoon doctor` says how to get it; `harpoon build` refuses without it)."""
    from harpoon.system import buildkitd

    choice = containerd_choice()
    services = [containerd_service(layout, choice)]
    binaries = config.find_buildkit()
    if not isinstance(binaries, str):
        services.append(buildkitd.service(layout, choice, binaries))
    return services


def prepare(layout: Layout, choice: config.ContainerdChoice) -> network.DefaultNetwork:
    """Writes the services' configuration: containerd's, nerdctl's and the default CNI
    network (kept if already written: its subnet holds addresses given out)."""
    layout.check_sockets()
    for directory in layout.service_directories():
        private.directory(directory)
    cni_dir = config.find_cni_plugin_dir()
    if cni_dir is None:
        raise ServiceError(
            "no CNI plugins (bridge, portmap, firewall…) in "
            f"{' or '.join(map(str, config.CNI_PLUGIN_DIRS))}: apt-get install "
            "containernetworking-plugins (or run scripts/install-deps)"
        )
    chosen = network.read(layout.cni_netconf_dir)
    if chosen is None:
        from harpoon.devenv.cni import subnets_in_use

        chosen = network.choose(dirs.root(), subnets_in_use())
        network.conflist_path(layout.cni_netconf_dir).write_text(
            network.render_conflist(chosen, layout.cni_ipam_dir)
        )
    layout.containerd_config.write_text(config.render_containerd_config(choice.flavour, layout))
    layout.nerdctl_toml.write_text(config.render_nerdctl_toml(layout, cni_dir, chosen))
    return chosen


def spawn(service: Service) -> int:
    """Starts the service detached and waits until its socket accepts a connection."""
    private.directory(service.log.parent)
    with contextlib.suppress(FileNotFoundError):
        service.socket.unlink()  # a stale one would answer nothing, or be mistaken
    started = time.monotonic()
    with service.log.open("ab") as log:
        process = subprocess.Popen(
            service.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=service.env, cwd="/", start_new_session=True, close_fds=True,
        )  # fmt: skip
    write_pid_file(service.pid_file, process.pid)
    while not accepts(service.socket):
        if process.poll() is not None:
            service.pid_file.unlink(missing_ok=True)
            raise ServiceError(
                f"{service.name} exited with status {process.returncode} while starting; "
                + log_tail(service.log)
            )
        if time.monotonic() - started > START_TIMEOUT_S:
            terminate(process.pid)
            process.wait()
            service.pid_file.unlink(missing_ok=True)
            raise ServiceError(
                f"{service.name} did not accept a connection on {service.socket} within "
                f"{START_TIMEOUT_S:.0f} s; " + log_tail(service.log)
            )
        time.sleep(POLL_INTERVAL_S)
    if service.after_ready is not None:
        service.after_ready()
    return process.pid


def status_of(service: Service) -> ServiceStatus:
    pid = service.pid()
    healthy = pid is not None and accepts(service.socket)
    return ServiceStatus(service.name, pid, service.socket, service.log, healthy,
                         service.origin, service.on_demand)  # fmt: skip


def status(layout: Layout) -> list[ServiceStatus]:
    return [status_of(service) for service in planned(layout)]


def _chosen(services: list[Service], names: Collection[str] | None) -> list[Service]:
    if names is None:
        return services
    unknown = set(names) - {service.name for service in services}
    if unknown:
        raise ServiceError(
            f"{', '.join(sorted(unknown))} not found (`harpoon doctor` names the fix)"
        )
    return [service for service in services if service.name in names]


def running(layout: Layout, names: Collection[str] | None = None) -> bool:
    """Whether the named services (all, if None) run and answer."""
    services = planned(layout)
    return all(status_of(service).healthy for service in _chosen(services, names))


def start(
    layout: Layout,
    progress: Callable[[str], None] = lambda _: None,
    names: Collection[str] | None = None,
) -> list[ServiceStatus]:
    """Starts what is not running of the named services (all, if None; containerd
    always: the others need it), after cleaning up what a crash left; idempotent."""
    from harpoon.system import cleanup

    with locked(layout):
        services = planned(layout)
        wanted = _chosen(services, None if names is None else {services[0].name, *names})
        if all(status_of(service).healthy for service in wanted):
            return [status_of(service) for service in services]
        if services[0].pid() is None:
            # containerd is not running: whatever its shims and VMs left is debris.
            cleanup.after_stop(layout, progress)
        prepare(layout, containerd_choice())
        for service in wanted:
            current = status_of(service)
            if current.healthy:
                continue
            if current.pid is not None:  # running but not answering: restart it
                progress(f"restarting {service.name} (pid {current.pid} does not answer)")
                service.shut_down(progress)
            progress(f"starting {service.name}: {service.origin}")
            service.launch()
        return [status_of(service) for service in services]


def stop_tasks(layout: Layout, progress: Callable[[str], None]) -> None:
    """Stops every running container through containerd, as `docker stop` would
    (SIGTERM, TASK_STOP_TIMEOUT_S, SIGKILL), and deletes the tasks: each shim then
    tears its VM down and runs the poststop hooks (nerdctl's CNI teardown)."""
    choice = containerd_choice()
    tasks = [line.split()[0] for line in _ctr(choice, layout, "tasks", "ls").splitlines()[1:]
             if line.strip()]  # fmt: skip
    if not tasks:
        return
    progress(f"stopping {len(tasks)} container(s)")
    for task in tasks:
        _ctr(choice, layout, "tasks", "kill", "--signal", "SIGTERM", task, check=False)
    deadline = time.monotonic() + TASK_STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        listed = _ctr(choice, layout, "tasks", "ls", check=False).splitlines()[1:]
        if not any(line.split()[2:3] == ["RUNNING"] for line in listed if line.strip()):
            break
        time.sleep(POLL_INTERVAL_S * 4)
    for task in tasks:
        _ctr(choice, layout, "tasks", "delete", "--force", task, check=False)


def stop(layout: Layout, progress: Callable[[str], None] = lambda _: None) -> None:
    """Stops the containers and the services, then removes whatever is left (a crashed
    containerd's shims and VMs, mounts, network namespaces, sockets, pid files)."""
    from harpoon.system import cleanup

    with locked(layout):
        services = planned(layout)
        containerd = status_of(services[0])
        if containerd.healthy:
            stop_tasks(layout, progress)
        for service in reversed(services):
            service.shut_down(progress)
        cleanup.after_stop(layout, progress)
