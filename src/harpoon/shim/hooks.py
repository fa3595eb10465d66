"""The container's OCI hooks that run on the host, run as runc runs them.

A VM runtime replaces runc, so it must run the spec's host-side hooks itself: nerdctl
sets up the container's network in a `createRuntime` hook and tears it down in a
`poststop` one, both reading the OCI State on stdin. This module reads and checks a
phase's hooks (`hooks_of`), writes the State (`state_json`) and runs a phase's hooks
(`run_hooks`). It holds no policy: when to call which phase, and what a failure does to
the container, is the caller's (below, what runc does). It must never run a hook of
`GUEST_PHASES` on the host, and never stops what a hook left running when it succeeded
or failed by itself (nerdctl's createRuntime leaves a port reserver behind).

When to call each phase (runc's points, on the shim's Task calls):
- Create: `prestart`, then `createRuntime`, once the container's host side exists (the
  netns, and the host pid that stands for the task) and before it is handed to the
  guest: nerdctl's hook sets up the netns the VM is then connected to. Status
  "creating", pid the task's. A failure fails Create, which undoes what it did, and
  runc then runs the `poststop` hooks too (its destroy does), so nerdctl releases the
  name and the network it had already taken.
- Start: `poststart`, once the init runs in the guest. Status "running". A failure
  kills the container and fails Start; Delete then goes as for any stopped container.
- Delete of the init: `poststop`, after the VM and everything Create set up is
  released. Status "stopped", no pid. A failure fails Delete after all of it was
  released, and the hooks after the failing one do not run; a Delete asked again must
  not run them again (runc's delete then finds no container, which containerd's runc
  shim takes for success: cmd/containerd-shim-runc-v2/process/init.go, `delete`).
- `createContainer` and `startContainer` run inside the container's namespaces (in
  runc, from runc init), that is inside the guest: harpoon does not run them.

What runc does (opencontainers/runc at 76d9cf5, main after v1.5.1, and the tags named):
- libcontainer/configs/config.go, `Command.Run`: the hook runs with Go's exec.Cmd:
  `path` is executed with `args` as its argv (no args: argv is [path]); its environment
  is exactly `env`, and with no `env` at all Go gives it runc's own environment; the
  State JSON is its stdin; stdout and stderr are collected and put in the error:
  "<exit status N | signal: S>, stdout: <out>, stderr: <err>". With a timeout, only the
  hook's own pid is SIGKILLed when it expires, and the error is "hook ran past
  specified timeout of <T>s" without the output. Go's Wait also waits for the end of
  the output pipes, so a child left holding them keeps runc waiting.
  `Hooks.Run`: a phase's hooks in the spec's order; the first failure ends the phase
  with "error running <phase> hook #<index>: <error>".
- libcontainer/specconv/spec_linux.go, `createCommandHook`: path, args and env as
  given, the timeout in seconds; nothing is checked (a timeout of 0 kills at once).
- libcontainer/process_linux.go (procHooks): `prestart` then `createRuntime`, in
  runc's namespaces, once cgroups are set and before pivot_root; status "creating", pid
  that of runc init. A failure fails `runc create`, whose runner then destroys the
  container (utils_linux.go, `runner.run`), and destroying runs the `poststop` hooks
  (libcontainer/state_linux.go, `destroy`), their failure only logged.
- libcontainer/rootfs_linux.go: `createContainer`, status "creating";
  libcontainer/standard_init_linux.go: `startContainer`, status "created", its env
  defaulting to the process's: both in the container.
- `poststart`, libcontainer/container_linux.go: released runc (v1.1.0 to v1.5.1) runs
  it at the end of `runc create`, before the user's process runs, status "created",
  its failure terminating init and failing create. On main (commit 3cdda464f, "Move
  poststart hook from runc create to runc start") it runs in `runc start` once the
  process has exec'd, status "running", its failure SIGKILLing the container and
  failing start. harpoon follows main and the runtime-spec.
- `poststop`, libcontainer/state_linux.go `destroy` (v1.1.0 and main alike): after the
  cgroup and the state directory are removed; status "stopped", no pid; its failure is
  returned ("unable to destroy container: error running poststop hook #i: ..."), so
  `runc delete` fails, though the container is gone. The runtime-spec asks for a
  warning and the remaining hooks instead; runc does not do that.
- The State is `specs.State` (vendor/.../runtime-spec/specs-go/state.go): ociVersion,
  id, status, pid (left out when 0), bundle, annotations (left out when empty: the
  spec's annotations, libcontainer/utils `Annotations`); ociVersion is runc's own
  runtime-spec version, 1.3.0 in v1.3 to v1.5, not the config's.
- A hook's working directory is runc's: the bundle (utils.go `setupSpec` changes to
  it for create; containerd starts a shim, and so runc delete, in the bundle).
- containerd's runc shim wraps runc's error in a plain error
  (cmd/containerd-shim-runc-v2/process/init.go, `runtimeError`), which errdefs sends as
  Unknown: users read "OCI runtime create failed: ...: unknown". HookFailed is Unknown.

Where harpoon differs, deliberately: the path is checked as the runtime-spec asks
(absolute, timeout above zero, strings); each hook runs in a process group of its own,
and a timeout or the caller's cancellation kills the whole group, so children do not
outlive it, and reaps the hook; once the hook has exited its output is taken as it is,
without waiting for children that still hold the pipes; the error names the hook's
path after runc's prefix and carries the end of its output even on a timeout.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from harpoon.errdefs import InvalidArgument, Unknown

# The runtime-spec version the State says it follows (runc v1.3 to v1.5 report this).
OCI_VERSION = "1.3.0"
# How much of each of a failed hook's stdout and stderr its error quotes (the end).
MAX_QUOTED_OUTPUT_BYTES = 4096
# What is read of a pipe once the hook has exited: its own output is there already; a
# child left writing to it is not read without end.
MAX_DRAIN_BYTES = 1 << 20

Status = Literal["creating", "created", "running", "stopped"]


class HookPhase(enum.StrEnum):
    """The spec's `hooks` keys, in lifecycle order."""

    PRESTART = "prestart"  # deprecated by the runtime-spec; runc still runs it
    CREATE_RUNTIME = "createRuntime"
    CREATE_CONTAINER = "createContainer"
    START_CONTAINER = "startContainer"
    POSTSTART = "poststart"
    POSTSTOP = "poststop"


# Phases whose hooks run in the runtime's namespaces, here the host's.
HOST_PHASES = frozenset(
    {HookPhase.PRESTART, HookPhase.CREATE_RUNTIME, HookPhase.POSTSTART, HookPhase.POSTSTOP}
)
# Phases whose hooks run in the container's namespaces: inside the guest, not run.
GUEST_PHASES = frozenset(HookPhase) - HOST_PHASES

# The State's status in each phase (runc main, and the runtime-spec for poststart).
STATUS_IN_PHASE: Mapping[HookPhase, Status] = {
    HookPhase.PRESTART: "creating",
    HookPhase.CREATE_RUNTIME: "creating",
    HookPhase.CREATE_CONTAINER: "creating",
    HookPhase.START_CONTAINER: "created",
    HookPhase.POSTSTART: "running",
    HookPhase.POSTSTOP: "stopped",
}


@dataclass(frozen=True)
class Hook:
    """One checked entry of a phase's hooks."""

    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] | None = None
    """None: the spec gave none, and the hook has the shim's environment (runc's)."""
    timeout_s: int | None = None

    @property
    def argv(self) -> list[str]:
        return list(self.args) if self.args else [self.path]


class HookFailed(Unknown):
    """A hook could not run, failed or timed out; its phase's later hooks did not run."""

    def __init__(self, phase: HookPhase, index: int, path: str, reason: str) -> None:
        self.phase = phase
        self.index = index
        self.path = path
        # runc's prefix, which users and tests look for; then the path, which runc omits.
        super().__init__(f"error running {phase} hook #{index}: {path}: {reason}")


def hooks_of(spec: Mapping[str, Any], phase: HookPhase) -> list[Hook]:
    """The spec's hooks of phase, in order, checked: InvalidArgument names the first
    entry the runtime-spec does not allow, and why."""
    hooks = spec.get("hooks")
    if hooks is None:
        return []
    if not isinstance(hooks, Mapping):
        raise InvalidArgument(f"hooks: an object was expected, not {hooks!r}")
    entries = hooks.get(phase.value)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InvalidArgument(f"hooks.{phase}: a list was expected, not {entries!r}")
    return [_hook(entry, f"hooks.{phase}[{index}]") for index, entry in enumerate(entries)]


def _hook(entry: object, where: str) -> Hook:
    if not isinstance(entry, Mapping):
        raise InvalidArgument(f"{where}: an object was expected, not {entry!r}")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{where}.path: a path is required, not {path!r}")
    if not os.path.isabs(path):
        raise InvalidArgument(
            f"{where}.path: {path!r} is not absolute, as the runtime-spec requires"
        )
    args = _strings(entry.get("args"), f"{where}.args")
    # No env at all is not an empty one: the hook then has the shim's (Go's exec).
    env = None if entry.get("env") is None else _strings(entry["env"], f"{where}.env")
    for variable in env or ():
        name, equals, _ = variable.partition("=")
        if not name or not equals:
            raise InvalidArgument(f"{where}.env: {variable!r} is not NAME=VALUE")
    timeout = entry.get("timeout")
    # bool is an int to Python, not to JSON.
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise InvalidArgument(
            f"{where}.timeout: {timeout!r} is not a whole number of seconds above zero"
        )
    _no_nul([path, *args, *(env or ())], where)
    return Hook(path, tuple(args), None if env is None else tuple(env), timeout)


def _strings(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{where}: a list of strings was expected, not {value!r}")
    return value


def _no_nul(strings: list[str], where: str) -> None:
    for string in strings:
        if "\0" in string:
            raise InvalidArgument(f"{where}: {string!r} holds a NUL byte, which exec refuses")


def state_json(
    container_id: str,
    pid: int | None,
    bundle: str,
    annotations: Mapping[str, str],
    status: Status,
) -> bytes:
    """The OCI State a hook reads on stdin, as runc writes it: pid and annotations are
    left out when there are none (runc's poststop has no pid)."""
    state: dict[str, object] = {"ociVersion": OCI_VERSION, "id": container_id, "status": status}
    if pid:
        state["pid"] = pid
    state["bundle"] = bundle
    if annotations:
        state["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()


async def run_hooks(
    hooks: Sequence[Hook], state: bytes, phase: HookPhase, *, cwd: str | os.PathLike[str]
) -> None:
    """Runs hooks one after the other, each reading state on stdin, in cwd (runc's is
    the bundle); the first that fails raises HookFailed and the rest do not run.
    Cancelled, it kills the running hook's process group and reaps the hook."""
    if phase not in HOST_PHASES:
        raise ValueError(f"{phase} hooks run in the container's namespaces, not the host's")
    for index, hook in enumerate(hooks):
        reason = await _run(hook, state, cwd)
        if reason is not None:
            raise HookFailed(phase, index, hook.path, reason)


def run_bundle_poststop(bundle: str) -> str | None:
    """The poststop hooks of the bundle's config.json, as runc's `delete --force` runs
    them for a container whose runtime did not (`shim delete` after a lost shim);
    why they failed, if they did (what failed is only reported: the clean-up goes on)."""
    import asyncio

    try:
        with open(os.path.join(bundle, "config.json")) as config:
            spec = json.load(config)
        if not isinstance(spec, dict):
            return None
        poststop = hooks_of(spec, HookPhase.POSTSTOP)
        if not poststop:
            return None
        annotations = spec.get("annotations")
        state = state_json(
            os.path.basename(os.path.normpath(bundle)), None, bundle,
            annotations if isinstance(annotations, dict) else {}, "stopped",
        )  # fmt: skip
        asyncio.run(run_hooks(poststop, state, HookPhase.POSTSTOP, cwd=bundle))
    except FileNotFoundError:
        return None
    except Exception as error:  # a failed hook must not stop the clean-up
        return str(error)
    return None


class _Tail:
    """The last MAX_QUOTED_OUTPUT_BYTES of a stream, and how much came before them."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.kept += chunk
        excess = len(self.kept) - MAX_QUOTED_OUTPUT_BYTES
        if excess > 0:
            del self.kept[:excess]
            self.dropped += excess

    def __str__(self) -> str:
        text = self.kept.decode(errors="replace").strip()
        return f"[{self.dropped} bytes before] {text}" if self.dropped else text


async def _run(hook: Hook, state: bytes, cwd: str | os.PathLike[str]) -> str | None:
    """Why hook failed, None when it succeeded."""
    import asyncio  # not at import: the daemon plans before it loads asyncio

    fds = _Descriptors()
    try:
        stdin_r, stdin_w = fds.pipe()
        out_r, out_w = fds.pipe()
        err_r, err_w = fds.pipe()
        try:
            popen = subprocess.Popen(
                hook.argv,
                executable=hook.path,
                stdin=stdin_r,
                stdout=out_w,
                stderr=err_w,
                env=os.environ if hook.env is None else _environ(hook.env),
                cwd=cwd,
                # Its own group, so that a timeout or a cancellation stops its children.
                process_group=0,
            )
        except OSError as error:
            what = f" ({error.filename})" if error.filename not in (None, hook.path) else ""
            return f"cannot execute it: {error.strerror}{what}"
        fds.close(stdin_r, out_w, err_w)  # the hook's ends: its alone now
        for fd in (stdin_w, out_r, err_r):
            os.set_blocking(fd, False)
        stdout, stderr = _Tail(), _Tail()
        async with asyncio.TaskGroup() as group:
            helpers = [
                group.create_task(_feed(stdin_w, state, fds)),
                group.create_task(_collect(out_r, stdout)),
                group.create_task(_collect(err_r, stderr)),
            ]
            try:
                status = await _exit_status(popen, hook.timeout_s)
            finally:
                # Its output so far is in the pipes; nothing is waited for any more.
                for helper in helpers:
                    helper.cancel()
        _drain(out_r, stdout)
        _drain(err_r, stderr)
    finally:
        fds.close_all()
    return _failure(hook, status, stdout, stderr)


def _failure(hook: Hook, status: int | None, stdout: _Tail, stderr: _Tail) -> str | None:
    if status is None:
        reason = f"hook ran past specified timeout of {hook.timeout_s:.1f}s"
    elif status < 0:
        reason = f"killed by signal {signal.Signals(-status).name}"
    elif status > 0:
        reason = f"exit status {status}"
    else:
        return None
    return f"{reason}, stdout: {stdout}, stderr: {stderr}"


class _Descriptors:
    """A hook's pipe ends, each closed once: when done with, else at the end."""

    def __init__(self) -> None:
        self._open: set[int] = set()

    def pipe(self) -> tuple[int, int]:
        read, write = os.pipe2(os.O_CLOEXEC)
        self._open |= {read, write}
        return read, write

    def close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def close_all(self) -> None:
        self.close(*self._open)


def _environ(env: tuple[str, ...]) -> dict[str, str]:
    # A name given twice takes its last value, as Go's exec does.
    return dict(variable.split("=", 1) for variable in env)


async def _exit_status(popen: subprocess.Popen[bytes], timeout_s: int | None) -> int | None:
    """The hook's exit status, None when it ran out of time; reaped either way, and
    cancelled or out of time, killed with its process group first."""
    import asyncio  # not at import: the daemon plans before it loads asyncio

    from harpoon import aio

    try:
        async with asyncio.timeout(timeout_s):
            return await aio.process_exit(popen)
    except TimeoutError:
        return None
    finally:
        if popen.returncode is None:
            # Not reaped yet, so its pid is still its group's: the group is no stranger's.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.kill()  # should it have left its group
            # Shielded: cancelled once more, the reaping still ends when the hook does.
            await asyncio.shield(asyncio.ensure_future(aio.process_exit(popen)))


async def _feed(fd: int, state: bytes, fds: _Descriptors) -> None:
    from harpoon import aio

    try:
        await aio.write_all(fd, state)
    except BrokenPipeError:
        pass  # the hook did not read it all: no error to runc (Go's exec) either
    finally:
        fds.close(fd)  # end of file: the hook may be reading up to it


async def _collect(fd: int, tail: _Tail) -> None:
    from harpoon import aio

    while chunk := await aio.read_some(fd):
        tail.add(chunk)


def _drain(fd: int, tail: _Tail) -> None:
    from harpoon import aio

    drained = 0
    while drained < MAX_DRAIN_BYTES:
        try:
            chunk = os.read(fd, aio.READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        if not chunk:
            return
        tail.add(chunk)
        drained += len(chunk)
