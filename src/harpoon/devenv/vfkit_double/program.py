"""The `vfkit` program of the double: one VM, from its command line to its exit.

The order is vfkit's (cmd/vfkit/main.go, root.go):
1. parse the command line (errors: "Error: ..." and status 1, as cobra and main print them);
2. write --pidfile (the double's own pid, no newline, mode 0600; vfkit never removes it);
3. check the configuration as vfkit and VZ do (harpoon.devenv.vfkit_double.checks);
4. bind the REST API (a socket that cannot be bound ends vfkit with status 1; vfkit
   finds out a moment later, in a goroutine, the double before starting the VM);
5. start the VM and wait up to 5 s for Running; log "virtual machine is running";
6. expose the vsock ports (an error is a warning: "error exposing vsock port ...");
7. wait for the VM to stop: status 0 when it stopped (guest power-off included), 1 on
   a virtualization error.
SIGTERM or SIGINT asks the guest to stop, waits 5 s for the VM to stop, then stops it
hard (vfkit's shutdownFunc), after which the program exits as in 7.

On the way out everything the double made goes (vfkit's exit handlers and deferred
closes): the vsock sockets, the REST socket, the NICs' local sockets, its helper
processes and its private directory. The double dies with whoever started it: SIGTERM
when its parent dies (PR_SET_PDEATHSIG; like harpoon's QEMU it is tied to the thread
that spawned it), so the graceful path above runs -- unless its launcher chose a signal
already (harpoon's backend: SIGKILL), which is kept; its own children get SIGKILL if the
double itself is killed, and its janitor removes its private directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harpoon import linux, private
from harpoon.devenv.vfkit_double import cmdline, launch, qemu, rest
from harpoon.devenv.vfkit_double.checks import ConfigurationError, GuestArch, check_vm
from harpoon.devenv.vfkit_double.cmdline import Options
from harpoon.devenv.vfkit_double.devices import VirtioFs, VirtioNet, VirtioVsock
from harpoon.devenv.vfkit_double.machine import Machine, StartError
from harpoon.devenv.vfkit_double.states import VMState
from harpoon.devenv.vfkit_double.vsock import ExposedPort
from harpoon.vmm import accel
from harpoon.vmm.backend import host_arch

log = logging.getLogger("vfkit")

#: cmd/vfkit/main.go shutdownFunc: how long a stop request gets before a hard stop.
STOP_GRACE_S = 5.0
#: prctl(2)'s query of the parent-death signal (linux/prctl.h).
PR_GET_PDEATHSIG = 2
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}


class LogrusFormatter(logging.Formatter):
    """vfkit's log lines (logrus's text format): time="..." level=info msg="..."."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created))
        level = "warning" if record.levelno == logging.WARNING else record.levelname.lower()
        message = record.getMessage().replace('"', '\\"')
        return f'time="{stamp}" level={level} msg="{message}"'


def main(argv: Sequence[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogrusFormatter())
    log.addHandler(handler)
    log.propagate = False
    try:
        command = cmdline.parse(sys.argv[1:] if argv is None else argv)
    except cmdline.CommandLineError as error:
        return _fail(error)
    if isinstance(command, cmdline.ShowHelp):
        print(cmdline.USAGE, end="")
        return 0
    if isinstance(command, cmdline.ShowVersion):
        print(f"vfkit version: {cmdline.VERSION}")
        return 0
    log.setLevel(LOG_LEVELS.get(command.log_level, logging.INFO))
    _die_with_parent()
    try:
        return asyncio.run(run(command))
    except (ConfigurationError, launch.LaunchError, StartError, OSError) as error:
        return _fail(error)


def _fail(error: BaseException) -> int:
    # cobra prints "Error: <err>" for a failed command, then vfkit's main prints <err>.
    print(f"Error: {error}", file=sys.stderr)
    print(error, file=sys.stderr)
    return 1


def _die_with_parent() -> None:
    """SIGTERM when the parent dies, unless whoever started the double asked for a
    signal already (harpoon's backend asks for SIGKILL: then its janitor cleans up)."""
    current = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(current), 0, 0, 0) == 0 and current.value:
        return
    parent = os.getppid()
    linux.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def write_pidfile(path: str) -> None:
    """cmd/vfkit/main.go + pkg/process: the pid, no newline, 0600."""
    private.write_file(path, str(os.getpid()).encode())


async def run(options: Options) -> int:
    """Runs the VM options describes to its end; the exit status."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop_requested.set)
    if options.pidfile:
        write_pidfile(options.pidfile)
    arch = check_vm(options)
    log.info("virtual machine parameters:")
    log.info("\tvCPUs: %d", options.cpus)
    log.info("\tmemory: %d MiB", options.memory_mib)
    async with contextlib.AsyncExitStack() as stack:
        directory = launch.private_dir()
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        stack.callback(launch.end_janitor, launch.start_janitor(directory))
        machine = Machine(options)
        stack.push_async_callback(machine.close)
        rest_listener = _bind_rest(options, stack)
        launched = _launch(options, arch, directory, stack)
        return await _lifetime(options, machine, launched, rest_listener, stop_requested, stack)


@dataclass(frozen=True)
class Launched:
    """QEMU, launched paused: its QMP socket and vhost-device-vsock's host socket."""

    process: subprocess.Popen[bytes]
    qmp_socket: Path
    uds: Path | None


def _bind_rest(options: Options, stack: contextlib.AsyncExitStack) -> socket.socket | None:
    uri = options.restful_uri
    if uri.scheme == "none":
        return None
    listener = rest.bind(uri)
    stack.callback(listener.close)
    if uri.scheme == "unix":
        # vfkit registers os.Remove(path) as an exit handler (pkg/rest/rest.go Start).
        stack.callback(_unlink, Path(uri.path))
    return listener


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _launch(
    options: Options, arch: GuestArch, directory: Path, stack: contextlib.AsyncExitStack
) -> Launched:
    """QEMU and its helpers, launched (paused); each undone by the stack."""
    shares = [d for d in options.devices if isinstance(d, VirtioFs)]
    fs_sockets = tuple(directory / f"virtiofs-{index}.sock" for index in range(len(shares)))
    for share, path in zip(shares, fs_sockets, strict=True):
        stack.callback(launch.end, launch.start_virtiofsd(share, path))
    vsock_socket = uds = None
    # One vsock device for all ports, even those without a host socket (vfkit pkg/vf
    # VirtioVsock.AddToVirtualMachineConfig).
    if any(isinstance(d, VirtioVsock) for d in options.devices):
        vsock_socket, uds = directory / "vhost-vsock.sock", directory / "vsock.uds"
        stack.callback(launch.end, launch.start_vsock_device(vsock_socket, uds))
    nic_fds, macs = [], []
    for nic in (d for d in options.devices if isinstance(d, VirtioNet)):
        datagrams, local = launch.connect_nic(nic)
        stack.callback(datagrams.close)
        if local is not None:
            # pkg/vf/virtionet.go Shutdown, an exit handler: the local socket goes.
            stack.callback(_unlink, local)
        nic_fds.append(datagrams.fileno())
        macs.append(nic.mac or launch.random_mac())
    qmp_socket = directory / "qmp.sock"
    with launch.listen(qmp_socket) as qmp_listener:
        binary = shutil.which(qemu.profile(arch).binary)
        if binary is None:
            raise launch.LaunchError(f"{qemu.profile(arch).binary} not found on PATH: install QEMU")
        # Emulated when the guest is not the host's architecture; else KVM if it works.
        accelerator = accel.choose(binary) if arch == host_arch() else "tcg"
        wiring = qemu.Wiring(
            qmp_listener.fileno(), vsock_socket, fs_sockets, tuple(nic_fds), tuple(macs)
        )
        argv = qemu.command_line(options, arch, accelerator, wiring)
        argv[0] = binary
        log.debug("QEMU: %s", " ".join(argv))
        process = launch.spawn(argv, pass_fds=(qmp_listener.fileno(), *nic_fds))
    stack.callback(launch.end, process)
    return Launched(process, qmp_socket, uds)


async def _lifetime(
    options: Options,
    machine: Machine,
    launched: Launched,
    rest_listener: socket.socket | None,
    stop_requested: asyncio.Event,
    stack: contextlib.AsyncExitStack,
) -> int:
    """Serves the REST API and the signals while the VM starts and runs; its status."""
    failure: StartError | None = None
    async with asyncio.TaskGroup() as tasks:
        background = [tasks.create_task(_stop_on_signal(machine, stop_requested))]
        if rest_listener is not None:
            background.append(tasks.create_task(rest.serve(rest_listener, machine)))
        try:
            status = await _run_vm(options, machine, launched, tasks, background, stack)
        except StartError as error:
            failure, status = error, 1
        finally:
            for task in background:
                task.cancel()
    if failure is not None:
        raise failure
    return status


async def _run_vm(
    options: Options,
    machine: Machine,
    launched: Launched,
    tasks: asyncio.TaskGroup,
    background: list[asyncio.Task[None]],
    stack: contextlib.AsyncExitStack,
) -> int:
    await machine.start(launched.process, launched.qmp_socket)
    log.info("virtual machine is running")
    for device in options.vsock_ports():
        assert launched.uds is not None  # a vsock port means a vsock device
        listening = " (listening)" if device.listen else ""
        log.info("Exposing vsock port %d on %s%s", device.port, device.socket_url, listening)
        port = ExposedPort(device, launched.uds)
        try:
            port.open()
        except OSError as error:
            log.warning("error exposing vsock port %d: %s", device.port, error)
            continue
        stack.callback(port.remove)
        background.append(tasks.create_task(port.serve()))
    log.info("waiting for VM to stop")
    if await machine.run() is VMState.ERROR:
        print("Error: virtualization error: hypervisor virtualization error", file=sys.stderr)
        return 1
    log.info("VM is stopped")
    return 0


async def _stop_on_signal(machine: Machine, requested: asyncio.Event) -> None:
    """cmd/vfkit/main.go shutdownFunc, once per SIGTERM/SIGINT."""
    while True:
        await requested.wait()
        requested.clear()
        log.info("captured signal, calling exit handlers and exiting..")
        await machine.request_stop()
        if not await machine.wait_stopped(STOP_GRACE_S):
            log.warning("failed to wait for VM stop: timeout waiting for VM state, forcing stop")
            await machine.hard_stop()
