"""The agent's process table: every process it runs for the host, by id.

Every process is a container's, run by crun (`harpoon.agent.oci`) from the OCI spec the
host sent (`harpoon.agent.container`). A process is created with its stdio pipes (so
the host can attach readers before it runs); crun exits at once, and the table learns
the container process's pid from crun's pid file (`adopt`) and, as its reaper, its
exit: the agent's SIGCHLD handler is the only place that calls waitpid, since as PID 1
the agent also reaps orphans it never started. Exit statuses follow the shell's
convention (128 + signal when killed). A terminal is the pty crun makes and sends on a
console socket: its master carries the process's input and its (single) output stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import struct
import termios
import time

from harpoon import aio, linux
from harpoon.agent import cgroups
from harpoon.agent.container import Container, OciProcess
from harpoon.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from harpoon.ttrpc.status import Code, TtrpcError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
F_SETPIPE_SZ = 1031  # linux/fcntl.h
OUTPUT_PIPE_BYTES = 1 << 20
INPUT_PIPE_BYTES = 1 << 20
MAX_UNCLAIMED_EXITS = 1024
# Signals Python sets to SIG_IGN; an exec'd program would inherit the ignore.
_SIGNALS_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)


class ProcessSpec:
    """What to run: a container's process, and the stdio the host wants of it."""

    # ProcessSpec and Process are plain classes rather than dataclasses: generating a
    # dataclass's methods at import costs the guest agent tens of ms under TCG.
    __slots__ = (
        "container",
        "container_id",
        "container_init",
        "process",
        "stderr",
        "stdin",
        "stdout",
        "terminal",
    )

    def __init__(
        self,
        container: Container,
        process: OciProcess | None = None,
        container_id: str = "",
        stdin: bool = False,
        stdout: bool = False,
        stderr: bool = False,
        terminal: bool = False,
    ) -> None:
        # The container the process runs in: for its init, the container it creates.
        self.container = container
        # The OCI process: for an exec, its own; for the container's init, the spec's.
        self.process = container.process if process is None else process
        # For an exec: the container (its init's id) it joins; empty for the init.
        self.container_id = container_id
        # The container's first process: `crun create` at CreateProcess, started by
        # StartProcess; when it exits, everything in its cgroup is killed.
        self.container_init = process is None
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.terminal = terminal

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"ProcessSpec({fields})"


class Process:
    """One process of the table, from creation to deletion."""

    __slots__ = (
        "child_stdio",
        "close_stdin_pending",
        "drained",
        "exit_status",
        "exited",
        "exited_at",
        "id",
        "io_ready",
        "oom_killed",
        "oom_kills_at_start",
        "output_fds",
        "pending_size",
        "pid",
        "spec",
        "started",
        "stdin_fd",
        "terminal_fd",
    )

    def __init__(self, id: str, spec: ProcessSpec) -> None:
        self.id = id
        self.spec = spec
        self.pid = 0
        self.exit_status: int | None = None
        self.exited_at = 0.0
        self.oom_kills_at_start = 0
        self.oom_killed = False
        self.stdin_fd: int | None = None
        # Read ends of the output pipes, keyed by stream name ("stdout", "stderr").
        self.output_fds: dict[str, int] = {}
        # Set when a stream has been read to EOF (or never existed).
        self.drained: dict[str, asyncio.Event] = {}
        self.exited = asyncio.Event()
        # The child's stdin, stdout and stderr (None: /dev/null), closed in the agent
        # once the child has them.
        self.child_stdio: list[int | None] = [None, None, None]
        self.terminal_fd: int | None = None
        self.started = False
        # Set once the output fds and stdin exist: at once for pipes; for a terminal crun
        # makes, when crun has sent it (an exec's, only when it starts).
        self.io_ready = asyncio.Event()
        # What the host asked of a terminal before it existed, applied when it does.
        self.close_stdin_pending = False
        self.pending_size: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Process(id={self.id!r}, pid={self.pid}, exit_status={self.exit_status})"


def find_executable(
    command: str, env: list[str], cwd: str, root: str, mounted: tuple[str, ...] = ()
) -> str | None:
    """Where command is under root (as execvpe would search it there), or None.

    Symlinks are not followed (an absolute link points into the root, not ours), so a
    dangling link passes here and fails at exec instead. A candidate at or under one of
    `mounted` (the container's bind mounts, not there before crun mounts them) is taken
    as found: exec decides.
    """
    if "/" in command:
        candidates = [os.path.join(cwd or "/", command)]
    else:
        path = _env_dict(env).get("PATH", DEFAULT_PATH)
        candidates = [os.path.join(d or ".", command) for d in path.split(":")]
    for candidate in candidates:
        if any(candidate == m or candidate.startswith(m.rstrip("/") + "/") for m in mounted):
            return candidate
        inside = os.path.join(root, candidate.lstrip("/"))
        if os.path.islink(inside) or (os.path.isfile(inside) and os.access(inside, os.X_OK)):
            return candidate
    return None


def executable_not_found(command: str) -> TtrpcError:
    # runc refuses at create time too, so a client sees the error from Create, and with
    # no errdefs class (runc's own error), word for word.
    return TtrpcError(Code.UNKNOWN, f'exec: "{command}": executable file not found in $PATH')


def _env_dict(env: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for entry in env:
        key, sep, value = entry.partition("=")
        if sep:
            result[key] = value
    return result


class ProcessTable:
    """Processes by id, and the reaper that turns SIGCHLD into exit statuses."""

    def __init__(self) -> None:
        self._by_id: dict[str, Process] = {}
        self._by_pid: dict[int, Process] = {}
        self._helpers: dict[int, asyncio.Future[int]] = {}
        # Exits of pids nobody has claimed yet: pid -> (wait status, generation).
        self._unclaimed: dict[int, tuple[int, int]] = {}
        self._generation = 0

    def get(self, process_id: str) -> Process:
        try:
            return self._by_id[process_id]
        except KeyError:
            raise NotFound(f"process {process_id!r} does not exist in the guest") from None

    def create(self, process_id: str, spec: ProcessSpec) -> Process:
        if process_id in self._by_id:
            raise AlreadyExists(f"process {process_id!r} already exists in the guest")
        if not spec.process.args:
            raise InvalidArgument(f"process {process_id!r} has no args to run")
        process = Process(process_id, spec)
        for name in ("stdout", "stderr"):
            process.drained[name] = asyncio.Event()
        if spec.terminal:
            process.drained["stderr"].set()  # crun's terminal arrives in attach_terminal
        else:
            if spec.stdin:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                # Bigger writes: each chunk written costs the agent a turn and a wake-up.
                with contextlib.suppress(OSError):
                    fcntl.fcntl(write_end, F_SETPIPE_SZ, INPUT_PIPE_BYTES)
                process.stdin_fd = write_end
                process.child_stdio[0] = read_end
            for index, (name, wanted) in enumerate(
                (("stdout", spec.stdout), ("stderr", spec.stderr)), start=1
            ):
                if wanted:
                    read_end, write_end = os.pipe2(os.O_CLOEXEC)
                    # Bigger pipes, bigger reads: each chunk costs the agent fixed work.
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(read_end, F_SETPIPE_SZ, OUTPUT_PIPE_BYTES)
                    os.set_blocking(read_end, False)
                    process.output_fds[name] = read_end
                    process.child_stdio[index] = write_end
                else:
                    process.drained[name].set()
            process.io_ready.set()
        self._by_id[process_id] = process
        return process

    def attach_terminal(self, process: Process, master: int) -> None:
        """The pty master crun made for a container process: its stdin and output."""
        os.set_inheritable(master, False)
        os.set_blocking(master, False)
        process.terminal_fd = master
        process.stdin_fd = os.dup(master) if process.spec.stdin else None
        process.output_fds["stdout"] = master
        if process.pending_size is not None:
            resize_terminal(process, *process.pending_size)
        process.io_ready.set()
        if process.close_stdin_pending:
            close_input(process)

    def release_child_stdio(self, process: Process) -> None:
        """Closes the agent's copies of the child's stdio once the child has them."""
        _close_child_stdio(process)
        process.io_ready.set()  # a terminal that never came: readers see end of file

    @property
    def generation(self) -> int:
        """How many times the reaper has run: exits of unknown pids newer than a
        generation taken before a helper ran may be the helper's container process's."""
        return self._generation

    def run_helper(
        self,
        argv: list[str],
        stdio: tuple[int | None, int | None, int | None],
        personality: int | None = None,
        executable: str | None = None,
    ) -> asyncio.Future[int]:
        """Starts a helper (crun) with the given stdio (None: /dev/null) and, if given,
        execution domain (personality(2), best effort), from `executable` if given,
        else argv[0]; the future is its exit status, set by the reaper (127 if it could
        not be executed, as from a shell).

        posix_spawn, not fork: glibc's shares the agent's memory with the child until it
        execs, where a fork copies the agent's page tables and leaves every page the
        agent writes next to fault once more. Under TCG that was ~12 ms a helper, plus
        ~10 ms of faults after it; posix_spawn takes ~5 ms. The child inherits the
        personality of the thread that spawns it, so the agent wears the helper's for
        the duration of the call."""
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        previous = None
        status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            if personality is not None:
                with contextlib.suppress(OSError):  # best effort
                    previous = linux.set_personality(personality)
            fds = (devnull if fd is None else fd for fd in stdio)
            pid = os.posix_spawn(
                executable or argv[0],
                argv,
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)],
                setsigmask=(),
                setsigdef=_SIGNALS_PYTHON_IGNORES,
            )
        except OSError:
            status.set_result(127)
            return status
        finally:
            if previous is not None:
                linux.set_personality(previous)
            os.close(devnull)
        # Registered before the loop can run the reaper again.
        self._helpers[pid] = status
        return status

    async def run_helper_to_end(self, argv: list[str], stdin: bytes = b"") -> tuple[int, str]:
        """Runs a helper (iptables-restore, a network script) to its end with `stdin`
        (it must fit a pipe's buffer: written before the helper reads) and returns its
        exit status and what it printed (stdout and stderr, the first 4 KiB)."""
        read_end, write_end = os.pipe()
        output_read, output_write = os.pipe()
        try:
            status = self.run_helper(argv, (read_end, output_write, output_write))
        finally:
            os.close(read_end)
            os.close(output_write)
        try:
            os.write(write_end, stdin)
            os.close(write_end)
            write_end = -1
            code = await status
            output = os.read(output_read, 4096).decode(errors="replace").strip()
        finally:
            if write_end >= 0:
                os.close(write_end)
            os.close(output_read)
        return code, output

    def adopt(self, process: Process, pid: int, since: int) -> None:
        """Takes on a container process crun started (and left to the agent, PID 1):
        its exit, if the reaper saw it after generation `since`, is its own."""
        process.pid = pid
        process.oom_kills_at_start = oom_kill_count()
        exited = self._unclaimed.pop(pid, None)
        # A pid that exists now is this process (alive, or a zombie the reaper will
        # report): an exit recorded for it belongs to an earlier holder of the pid,
        # e.g. the warm-up's orphaned init reaped while this container was created.
        if exited is not None and exited[1] > since and not os.path.exists(f"/proc/{pid}"):
            self._finish(process, exited[0])
        else:
            self._by_pid[pid] = process

    def reap(self) -> None:
        """Collects every exited child; called on SIGCHLD. Orphans are dropped."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._generation += 1
            helper = self._helpers.pop(pid, None)
            if helper is not None:
                if not helper.done():
                    helper.set_result(os.waitstatus_to_exitcode(status))
                continue
            process = self._by_pid.pop(pid, None)
            if process is None:
                # An orphan, or a container process whose pid file is not read yet.
                self._unclaimed[pid] = (status, self._generation)
                if len(self._unclaimed) > MAX_UNCLAIMED_EXITS:
                    del self._unclaimed[next(iter(self._unclaimed))]
                continue
            self._finish(process, status)

    def _finish(self, process: Process, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        process.exit_status = 128 - code if code < 0 else code
        process.oom_killed = (
            code == -signal.SIGKILL and oom_kill_count() > process.oom_kills_at_start
        )
        process.exited_at = time.time()
        process.exited.set()
        if process.spec.container_init:
            # As when the init of a PID namespace dies (or runc's kill of the cgroup
            # when the container has no PID namespace of its own): nothing may live on.
            cgroups.kill_container_group()

    def signal(self, process: Process, signum: int, all_processes: bool = False) -> None:
        if all_processes:
            # Every process of the container (its PID namespace), as runc's kill --all
            # does with its cgroup: not only those the agent started.
            for pid in cgroups.container_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            return
        if process.pid == 0:  # a container's init has a pid once created, as under runc
            raise FailedPrecondition(f"process {process.id!r} has not been started")
        if process.exit_status is not None:
            raise NotFound(f"process {process.id!r} has already exited")
        os.kill(process.pid, signum)

    def check_deletable(self, process: Process) -> None:
        if process.started and process.exit_status is None:
            raise FailedPrecondition(f"process {process.id!r} is still running")

    def delete(self, process: Process) -> None:
        self.check_deletable(process)
        for fd in {*process.output_fds.values(), process.stdin_fd, process.terminal_fd}:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        _close_child_stdio(process)
        process.output_fds.clear()
        process.stdin_fd = process.terminal_fd = None
        del self._by_id[process.id]


def _close_child_stdio(process: Process) -> None:
    for fd in process.child_stdio:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    process.child_stdio = [None, None, None]


def resize_terminal(process: Process, width: int, height: int) -> None:
    if process.terminal_fd is None:
        process.pending_size = (width, height)
    else:
        fcntl.ioctl(
            process.terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0)
        )


def oom_kill_count() -> int:
    """How many processes the guest's OOM killer has killed since boot."""
    try:
        with open("/proc/vmstat", "rb") as vmstat:
            for line in vmstat:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def read_output(process: Process, stream: str) -> bytes | None:
    """The next chunk available on a stream, or None at end of file."""
    await process.io_ready.wait()
    fd = process.output_fds.get(stream)
    if fd is None:
        return None
    try:
        chunk = await aio.read_some(fd, OUTPUT_PIPE_BYTES)
    except OSError as error:
        if error.errno != errno.EIO:  # a pty master reads EIO once every slave is closed
            raise
        chunk = b""
    if chunk:
        return chunk
    if fd != process.terminal_fd:  # the terminal's master is closed on delete
        os.close(fd)
    del process.output_fds[stream]
    process.drained[stream].set()
    return None


async def write_input(process: Process, data: bytes | memoryview) -> None:
    """Writes all of data to the process's stdin, waiting while the pipe is full."""
    await process.io_ready.wait()
    fd = process.stdin_fd
    if fd is None:
        raise FailedPrecondition(f"process {process.id!r} has no open stdin")
    os.set_blocking(fd, False)
    await aio.write_all(fd, data)


def close_input(process: Process) -> None:
    if not process.io_ready.is_set():
        process.close_stdin_pending = True
        return
    if process.stdin_fd is None:
        return
    if process.terminal_fd is not None:
        # A terminal has no EOF of its own: the line discipline's EOF character ends
        # input for a reader in canonical mode, as when a user types Ctrl-D.
        with contextlib.suppress(OSError):
            os.write(process.stdin_fd, termios.tcgetattr(process.stdin_fd)[6][termios.VEOF])
    os.close(process.stdin_fd)
    process.stdin_fd = None
