"""harpoon's walking skeleton under a real containerd (1.6 and 2.3) driven by real `ctr`.

Each test runs busybox in its own VM through `ctr run --runtime io.containerd.harpoon.v1`
and checks what a user sees: output, exit statuses, signals, the event order, the
guest's kernel, and that nothing (VM process, socket, mount, state directory) is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harpoon.devenv.containerd import Containerd
from harpoon.shim import paths

pytestmark = pytest.mark.vm

HARPOON = "io.containerd.harpoon.v1"
RUN_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
RUNNING_TIMEOUT_S = 120.0


def ctr_command(containerd: Containerd, *args: str) -> list[str]:
    return [str(containerd.flavour.ctr), "--address", containerd.address,
            "--namespace", containerd.namespace, *args]  # fmt: skip


def run(containerd: Containerd, image: str, container_id: str, *argv: str) -> tuple[int, str]:
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, image, container_id, *argv,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout


@pytest.fixture
def background(containerd: Containerd) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts in the background; killed if the test leaves them."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_in_background(
    containerd: Containerd, started: list[subprocess.Popen[bytes]], *args: str
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ctr_command(containerd, *args), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    started.append(process)
    return process


def wait_until_running(containerd: Containerd, container_id: str) -> None:
    deadline = time.monotonic() + RUNNING_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in containerd.ctr("task", "ls", check=False).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id and fields[-1] == "RUNNING":
                return
        time.sleep(0.2)
    raise AssertionError(f"task {container_id} never reached RUNNING")


def task_topics(events: subprocess.Popen[bytes], container_id: str) -> list[str]:
    """Stops a running `ctr events` and returns the /tasks/ topics it saw for a container."""
    time.sleep(1.0)  # the last events (TaskDelete) are published as a run ends
    events.send_signal(signal.SIGTERM)
    out, _ = events.communicate(timeout=30)
    # Lines read "<date> <time> <zone> UTC <namespace> /tasks/<topic> {json}".
    return [
        word
        for line in out.decode().splitlines()
        if container_id in line
        for word in line.split()
        if word.startswith("/tasks/")
    ]


def start_sleeper(containerd: Containerd, image: str, container_id: str) -> None:
    """Starts a detached `sleep 1000` container and waits until it runs."""
    containerd.ctr(
        "run", "-d", "--runtime", HARPOON, image, container_id, "sleep", "1000",
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    wait_until_running(containerd, container_id)


def delete_once_stopped(
    containerd: Containerd, container_id: str, exit_code: int, never_stopped: str
) -> None:
    """Waits for the task to stop, deletes it (checking its exit code) and the
    container, and checks that nothing of either is left."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while "STOPPED" not in containerd.ctr("task", "ls").stdout:
        assert time.monotonic() < deadline, never_stopped
        time.sleep(0.2)
    deleted = containerd.ctr("task", "delete", container_id)
    assert f"exit code {exit_code}" in deleted.stdout + deleted.stderr
    containerd.ctr("container", "delete", container_id)
    while leftovers(containerd, container_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(containerd, container_id) == []


def task_states(containerd: Containerd) -> dict[str, str]:
    lines = containerd.ctr("task", "ls", check=False).stdout.splitlines()[1:]
    return {fields[0]: fields[-1] for fields in map(str.split, lines) if fields}


def remove(containerd: Containerd, container_id: str) -> None:
    """Whatever state a container was left in: killed, its task and it deleted."""
    state = task_states(containerd).get(container_id)
    if state is not None and state != "STOPPED":
        containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id, check=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while task_states(containerd).get(container_id) not in ("STOPPED", None):
            assert time.monotonic() < deadline, f"{container_id} never stopped"
            time.sleep(0.2)
    containerd.ctr("task", "delete", container_id, check=False)
    containerd.ctr("container", "delete", container_id, check=False)


def vm_processes(state_dir: Path) -> list[int]:
    """Host processes whose command line names the VM's state directory (its QEMU)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(state_dir).encode() in cmdline and b"qemu" in cmdline:
                found.append(int(entry))
    return found


def leftovers(containerd: Containerd, container_id: str) -> list[str]:
    state_dir = paths.vm_state_dir(containerd.namespace, container_id)
    found = [f"VM process {pid}" for pid in vm_processes(state_dir)]
    if state_dir.exists():
        found.append(f"state directory {state_dir}")
    share = paths.share_dir(containerd.namespace, container_id)
    if share.exists():
        found.append(f"rootfs share {share}")
    socket = paths.socket_path(containerd.address, containerd.namespace, container_id)
    if socket.exists():
        found.append(f"shim socket {socket}")
    netns = paths.netns_path(containerd.namespace, container_id)
    if netns.exists():
        found.append(f"network namespace {netns}")
    found += [f"mount {m}" for m in containerd.mounts() if container_id in m or str(netns) in m]
    return found


def test_echo_runs_in_a_vm_and_prints_hello(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    assert run(containerd, busybox_image, container_id, "echo", "hello") == (0, "hello\n")


def test_exit_status_of_the_container_is_ctrs_exit_status(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    status, _ = run(containerd, busybox_image, container_id, "sh", "-c", "exit 3")
    assert status == 3


def test_uname_shows_the_guest_kernel_not_the_hosts(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    from harpoon.guest import find_guest
    from harpoon.vmm.qemu_launch import host_arch

    status, out = run(containerd, busybox_image, container_id, "uname", "-r")
    assert status == 0
    assert out.strip() == find_guest(host_arch()).kernel_release
    assert out.strip() != os.uname().release


def test_the_containers_first_process_is_pid_1_of_its_own_namespace(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    # ls's listing goes to a file first: in a pipe, grep may or may not have been forked
    # yet when ls reads /proc (the count depended on scheduling).
    script = "echo $$; ls /proc > /tmp/proc; grep -c '^[0-9]' /tmp/proc"
    status, out = run(containerd, busybox_image, container_id, "sh", "-c", script)
    # Only the shell and ls are in the container's /proc, as under runc.
    assert (status, out.split()) == (0, ["1", "2"])


def test_sigterm_without_a_handler_does_not_stop_pid_1_but_sigkill_does(
    containerd: Containerd, busybox_image: str, container_id: str,
    background: list[subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    ctr_run = run_in_background(
        containerd, background, "run", "--rm", "--runtime", HARPOON, busybox_image,
        container_id, "sleep", "1000",
    )  # fmt: skip
    wait_until_running(containerd, container_id)
    containerd.ctr("task", "kill", container_id)  # SIGTERM: PID 1 has no handler
    time.sleep(2)
    assert ctr_run.poll() is None, "SIGTERM stopped a PID 1 that has no handler for it"
    containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id)
    assert ctr_run.wait(RUN_TIMEOUT_S) == 137


def test_sigkill_ends_the_container_with_137(
    containerd: Containerd, busybox_image: str, container_id: str,
    background: list[subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    ctr_run = run_in_background(
        containerd, background, "run", "--rm", "--runtime", HARPOON, busybox_image,
        container_id, "sleep", "1000",
    )  # fmt: skip
    wait_until_running(containerd, container_id)
    containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id)
    assert ctr_run.wait(RUN_TIMEOUT_S) == 137


def test_sigterm_runs_the_containers_trap(
    containerd: Containerd, busybox_image: str, container_id: str,
    background: list[subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    script = 'trap "exit 42" TERM; echo trapped; while :; do sleep 1; done'
    ctr_run = run_in_background(
        containerd, background, "run", "--rm", "--runtime", HARPOON, busybox_image,
        container_id, "sh", "-c", script,
    )  # fmt: skip
    assert ctr_run.stdout is not None
    # RUNNING only means started: the shell must have set its trap before we signal.
    assert ctr_run.stdout.readline() == b"trapped\n"
    containerd.ctr("task", "kill", container_id)
    assert ctr_run.wait(RUN_TIMEOUT_S) == 42


def test_events_arrive_as_create_start_exit_delete(
    containerd: Containerd, busybox_image: str, container_id: str,
    background: list[subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    events = run_in_background(containerd, background, "events")
    time.sleep(0.5)  # let `ctr events` subscribe before anything happens
    assert run(containerd, busybox_image, container_id, "true")[0] == 0
    topics = task_topics(events, container_id)
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]


def test_rm_leaves_no_vm_socket_mount_or_state(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    assert run(containerd, busybox_image, container_id, "true") == (0, "")
    assert leftovers(containerd, container_id) == []


def test_a_killed_shim_takes_its_vm_and_delete_cleans_up(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    start_sleeper(containerd, busybox_image, container_id)
    state_dir = paths.vm_state_dir(containerd.namespace, container_id)
    assert vm_processes(state_dir), "the container's VM is not running"
    [shim] = [s for s in containerd.shims() if s.flag("id") == container_id]
    os.kill(shim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while vm_processes(state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm_processes(state_dir) == [], "the VM outlived its shim"
    # containerd notices the dead shim, runs `shim delete` and drops the task.
    while container_id in containerd.tasks() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert container_id not in containerd.tasks()
    containerd.ctr("container", "delete", container_id)
    # 2.3 drops the task before its `shim delete` has finished: give that a moment.
    while leftovers(containerd, container_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(containerd, container_id) == []


def test_shim_delete_ends_a_daemon_that_never_got_shutdown(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    """containerd runs `shim delete` when it has lost a shim (its connection, a restart)
    without a Shutdown: the daemon must not live on, nor its VM as a zombie."""
    start_sleeper(containerd, busybox_image, container_id)
    state_dir = paths.vm_state_dir(containerd.namespace, container_id)
    [shim] = [s for s in containerd.shims() if s.flag("id") == container_id]
    assert shim.argv[-1] == "start" and vm_processes(state_dir)
    bundle = os.readlink(f"/proc/{shim.pid}/cwd")
    deleted = subprocess.run(
        [*shim.argv[:-1], "delete"], cwd=bundle, stdin=subprocess.DEVNULL,
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert deleted.returncode == 0, deleted.stderr
    assert not running(shim.pid), "the daemon outlived `shim delete`"
    assert vm_processes(state_dir) == [], "the VM outlived `shim delete`"
    deadline = time.monotonic() + 30
    while container_id in containerd.tasks() and time.monotonic() < deadline:
        time.sleep(0.1)
    containerd.ctr("task", "delete", container_id, check=False)
    containerd.ctr("container", "delete", container_id)
    while leftovers(containerd, container_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(containerd, container_id) == []


def running(pid: int) -> bool:
    """Whether pid is alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_vm_that_dies_ends_its_task_and_delete_cleans_up(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    """QEMU killed under a running container (as by the OOM killer): the container's
    processes are gone with it, so the task must stop, with 255 as containerd reports
    a task whose shim died (how it ended is unknown), and delete must leave nothing."""
    start_sleeper(containerd, busybox_image, container_id)
    state_dir = paths.vm_state_dir(containerd.namespace, container_id)
    [qemu] = vm_processes(state_dir)
    os.kill(qemu, signal.SIGKILL)
    delete_once_stopped(containerd, container_id, 255, "the task outlived its VM")


def test_a_running_container_survives_a_containerd_restart(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    start_sleeper(containerd, busybox_image, container_id)
    containerd.restart()
    wait_until_running(containerd, container_id)
    containerd.ctr("task", "kill", "--signal", "SIGKILL", container_id)
    delete_once_stopped(
        containerd, container_id, 137, "the kill after the restart did not stop the task"
    )


def test_a_missing_executable_fails_clearly_and_leaves_nothing(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, busybox_image, container_id, "no-such-command",
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no-such-command" in result.stderr and "not found" in result.stderr
    containerd.ctr("container", "delete", container_id, check=False)
    deadline = time.monotonic() + 30
    while leftovers(containerd, container_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(containerd, container_id) == []


#: Goes past a memory limit inside one read(2) into a 200 MiB buffer, so that the
#: cgroup's reclaim has nothing to thrash on. A shell holding 1 GiB in a variable (the
#: command before) grows between system calls, and busybox's pages, mapped from the 9p
#: rootfs, were reclaimed and read back again and again: under TCG the OOM kill then
#: came after 100-600+ s in about 1 run in 6 instead of ~15 s (2026-12-02).
OOM_COMMAND = ("dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1")


def test_exceeding_the_memory_limit_kills_with_137_and_publishes_oom(
    containerd: Containerd, busybox_image: str, container_id: str,
    background: list[subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    events = run_in_background(containerd, background, "events")
    time.sleep(0.5)  # let `ctr events` subscribe
    # 64 MiB allowed; dd fills a 200 MiB buffer (less than the VM's RAM, so it gets one).
    result = containerd.ctr(
        "run", "--rm", "--runtime", HARPOON, "--memory-limit", str(64 << 20), busybox_image,
        container_id, *OOM_COMMAND, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 137, result.stdout + result.stderr
    topics = task_topics(events, container_id)
    assert "/tasks/oom" in topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit")


def test_rlimits_and_no_new_privileges_of_the_spec_apply(
    containerd: Containerd, busybox_image: str, container_id: str
) -> None:
    # ctr's default spec sets RLIMIT_NOFILE 1024 and noNewPrivileges, as runc applies them.
    status, out = run(
        containerd, busybox_image, container_id, "sh", "-c",
        "ulimit -n; grep NoNewPrivs /proc/self/status",
    )  # fmt: skip
    assert status == 0
    assert out.split() == ["1024", "NoNewPrivs:", "1"]
