"""A stand-in for crun, for unit tests that run the guest agent on the host
(tests/unit/fake_vm.py): the commands and files the agent uses (harpoon.agent.oci), with
the container's process run on the host as it is, without namespaces, chroot or cgroups.

- `create --bundle B --pid-file=P ID`: forks the container's init, which waits on
  <root>/<ID>/exec.fifo (held open read-write, so the agent's non-blocking open for
  writing finds a reader, as crun's init does) and then execs the spec's process in
  the spec's root.path (its cwd under it); writes <root>/<ID>/status (pid and start
  time, as crun 1.8.1 does), the pid file, and the pid into the fake cgroup; exits.
- `start ID`: crun's start: one byte into the fifo, which it unlinks.
- `exec --detach --process=F --pid-file=P ID`: forks F's process in the container's
  root; writes the pid file and the fake cgroup; exits.
- `delete [--force] ID`: kills what is left in the container's cgroup (with --force),
  removes the state.

Errors go to the `--log=file:` file, one line, as crun's do; the container's stdio is
this program's fds 0-2. The fake cgroup is the directory $HARPOON_FAKE_CGROUP_ROOT
(crun's cgroupsPath under it). `HARPOON_FAKE_CRUN_FAIL=<command>` makes that command
fail. Only the standard library: it runs with `python3 -IS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from typing import Any

FAIL_ENV = "HARPOON_FAKE_CRUN_FAIL"
CGROUP_ROOT_ENV = "HARPOON_FAKE_CGROUP_ROOT"


class CrunError(Exception):
    pass


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rpartition(b")")[2].split()[19])


def guest_process(pid: int) -> bool:
    """Whether pid is the guest's: a child of the agent (this program's parent, the
    PID 1 and reaper of the container's processes); never a pid reused since."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[1]) == os.getppid()
    except (OSError, ValueError, IndexError):
        return False


def cgroup_procs(config: dict[str, Any]) -> str:
    path = (config.get("linux") or {}).get("cgroupsPath", "/container")
    return os.path.join(os.environ[CGROUP_ROOT_ENV], path.strip("/"), "cgroup.procs")


def spawn(process: dict[str, Any], root: str, wait_fd: int | None) -> int:
    """Forks the container process: it waits for a byte on wait_fd (if any), then execs."""
    pid = os.fork()
    if pid:
        return pid
    try:
        if wait_fd is not None:
            os.read(wait_fd, 1)
            os.close(wait_fd)
        os.chdir(os.path.join(root, (process.get("cwd") or "/").lstrip("/")))
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them
            signal.signal(signum, signal.SIG_DFL)
        env = dict(entry.split("=", 1) for entry in process.get("env") or [] if "=" in entry)
        args = process["args"]
        os.execvpe(args[0], args, env)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.write(2, f"fake crun: exec {process.get('args')}: {error}\n".encode())
    os._exit(127)


def record(pid: int, pid_file: str, config: dict[str, Any]) -> None:
    with open(cgroup_procs(config), "a") as procs:
        procs.write(f"{pid}\n")
    with open(pid_file, "w") as out:
        out.write(str(pid))


def load_state(root: str, container_id: str) -> dict[str, Any]:
    try:
        with open(os.path.join(root, container_id, "status")) as status:
            state: dict[str, Any] = json.load(status)
    except FileNotFoundError:
        raise CrunError(f"container `{container_id}` does not exist") from None
    return state


def create(root: str, options: dict[str, str], container_id: str) -> None:
    if "console-socket" in options:
        raise CrunError("the fake crun makes no terminals")
    bundle = options["bundle"]
    with open(os.path.join(bundle, "config.json")) as config_file:
        config = json.load(config_file)
    state = os.path.join(root, container_id)
    try:
        os.makedirs(state)
    except FileExistsError:
        raise CrunError(f"container `{container_id}` already exists") from None
    fifo = os.path.join(state, "exec.fifo")
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
    pid = spawn(config["process"], config["root"]["path"], fd)
    os.close(fd)
    status = {"pid": pid, "process-start-time": start_time(pid), "bundle": bundle,
              "rootfs": config["root"]["path"]}  # fmt: skip
    with open(os.path.join(state, "status"), "w") as out:
        json.dump(status, out, indent=4)
    record(pid, options["pid-file"], config)


def start(root: str, container_id: str) -> None:
    load_state(root, container_id)
    fifo = os.path.join(root, container_id, "exec.fifo")
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CrunError("container already started") from None
    except OSError:
        raise CrunError("container is not running") from None
    os.unlink(fifo)
    os.write(fd, b"\0")
    os.close(fd)


def exec_process(root: str, options: dict[str, str], container_id: str) -> None:
    state = load_state(root, container_id)
    with open(os.path.join(state["bundle"], "config.json")) as config_file:
        config = json.load(config_file)
    with open(options["process"]) as process_file:
        process = json.load(process_file)
    record(spawn(process, state["rootfs"], None), options["pid-file"], config)


def delete(root: str, options: dict[str, str], container_id: str) -> None:
    state = load_state(root, container_id)
    if "force" in options:
        with open(os.path.join(state["bundle"], "config.json")) as config_file:
            config = json.load(config_file)
        with contextlib.suppress(FileNotFoundError), open(cgroup_procs(config)) as procs:
            for pid in map(int, procs.read().split()):
                if guest_process(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(os.path.join(root, container_id))


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """--name=value, --name value (--bundle, --root) and --flag options; the rest."""
    options: dict[str, str] = {}
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            rest.append(arg)
            continue
        name, equals, value = arg[2:].partition("=")
        if not equals and name in ("bundle", "root"):
            value = next(args)
        options[name] = value
    return options, rest


def run(argv: list[str]) -> None:
    options, rest = parse(argv)
    command, *operands = rest
    if os.environ.get(FAIL_ENV) == command:
        raise CrunError(f"{command} failed as the test asked")
    root, container_id = options["root"], operands[-1]
    if command == "create":
        create(root, options, container_id)
    elif command == "start":
        start(root, container_id)
    elif command == "exec":
        exec_process(root, options, container_id)
    elif command == "delete":
        delete(root, options, container_id)
    else:
        raise CrunError(f"unknown command {command}")


def main() -> None:
    options, _ = parse(sys.argv[1:])
    log = options.get("log", "").removeprefix("file:")
    try:
        run(sys.argv[1:])
    except Exception as error:
        if log:
            with open(log, "a") as out:
                out.write(f"{error}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
