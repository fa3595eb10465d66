"""VM templates: a guest booted to "agent ready" once and saved, so later VMs restore it.

A template is keyed by everything its saved state depends on (`template_key`: the
backend's `template_identity(config)` — VMM binary, machine, accelerator, cpus, memory,
devices with their share tags and read-only flags, kernel arguments, kernel and
initrd — plus FORMAT_VERSION). It is taken before the agent mounts anything (a mounted
9p share blocks migration) with the shares pointing at an empty placeholder directory;
each restore points them at its own directories.

The template guest runs with its RAM in a file (`VMConfig.memory_file`), so its saved
state is the devices alone and a restored VM maps that file copy-on-write: restoring
loads ~60 KB, not the ~100 MB of RAM the guest touched, and restored VMs share the
pages none of them wrote.

Layout, under $HARPOON_TEMPLATE_DIR (<state>/templates, harpoon.dirs):
    <key>/state, <key>/memory,        one template, published by a rename, never edited
    <key>/meta.json                   (the memory file is mapped by running VMs)
    build.lock                        held while a template is built (one build at a time:
                                      each is a VM working flat out; and a lock file per
                                      key would pile up, since none can be removed safely)
    .build-<pid>-<random>/            a build in progress; a dead builder's is removed

A build's VMs keep their sockets, pid and console files in $TMPDIR/hp-template-<pid>-*
rather than under the store: unix socket paths are limited to 107 bytes, which a store
under a long path would exceed.

Nothing here may ever break a container start: a template that is missing, unreadable
or fails to restore means a cold boot. Only a template whose state the VMM refuses
(TemplateRefused) is removed, to be rebuilt: a restore that failed because its VM was
killed from outside, or did not answer in time, says nothing about the template.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon import dirs, private
from harpoon.vmm.base import VirtualMachine, VMConfig, VMError

if TYPE_CHECKING:
    # asyncio is imported where it is used: a shim looks its template up (and launches
    # the VM) before it loads asyncio (harpoon.shim.daemon). The agent client and
    # protobuf are loaded once the guest is resuming (restore).
    import asyncio

    from harpoon.api.agent.v1 import agent_pb2
    from harpoon.sandbox.agent_client import AgentClient
    from harpoon.sandbox.ports import Port
    from harpoon.vmm.backend import Backend

# 2: guest RAM in its own file, left out of the saved state; 3: saved running, so that
# a restored guest starts as soon as it is loaded.
FORMAT_VERSION = 3
TEMPLATE_DIR_ENV = dirs.TEMPLATE_DIR_ENV
TEMPLATES_ENV = "HARPOON_TEMPLATES"  # "off" or "0": always boot cold
SCRATCH_PREFIX = "hp-template-"
STATE_NAME = "state"
MEMORY_NAME = "memory"
META_NAME = "meta.json"
KEY_CHARS = 24
KEEP_TEMPLATES = 4  # the most recently used ones; each holds ~130 MB of guest memory
BUILD_TIMEOUT_S = 120.0
RESTORE_HELLO_TIMEOUT_S = 5.0  # from the state's load starting; a cold boot takes ~5 s
RESTORE_CALL_TIMEOUT_S = 120.0  # Hello is queued before the guest runs: the above bounds it
LOCK_POLL_S = 0.1
BUILD_LOCK_NAME = "build.lock"
# The store is root's alone (harpoon.private): a state or memory file is guest memory,
# with the guest's secrets in it.
PRIVATE_MODE = private.DIR_MODE

log = logging.getLogger(__name__)

MakeVM = Callable[[VMConfig], VirtualMachine]
# How long a failed restore waits for its VMM's exit, to tell "the VMM refused the state"
# (it exits on its own, with an error status) from a VM killed or hung.
REFUSAL_EXIT_WAIT_S = 1.0


class TemplateRefused(VMError):
    """The VMM refused the template's saved state (it exited on its own with an error
    while loading it): the template is broken. Any other failed restore (a VM killed
    from outside, one that does not answer) says nothing about the template."""


def template_key(identity: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"format": FORMAT_VERSION, **identity}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_CHARS]


@dataclass(frozen=True)
class Template:
    key: str
    directory: Path

    @property
    def state(self) -> Path:
        return self.directory / STATE_NAME

    @property
    def memory(self) -> Path:
        return self.directory / MEMORY_NAME


class TemplateStore:
    """The templates under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_environment(cls) -> TemplateStore | None:
        """The store $HARPOON_TEMPLATE_DIR names, or None when $HARPOON_TEMPLATES is off."""
        if os.environ.get(TEMPLATES_ENV, "").lower() in ("0", "off", "no", "false"):
            return None
        return cls(Path(dirs.template_dir()))

    def find(self, key: str) -> Template | None:
        """The published template for key if it looks whole (two stats and a small read)."""
        # One stat more: a store an older harpoon made looser is tightened when used.
        with contextlib.suppress(OSError):
            private.tighten(self.root)
        directory = self.root / key
        try:
            meta = json.loads((directory / META_NAME).read_text())
            if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
                return None
            if (directory / STATE_NAME).stat().st_size != meta["state_bytes"]:
                return None
            if (directory / MEMORY_NAME).stat().st_size != meta["memory_bytes"]:
                return None
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return Template(key, directory)

    def mark_used(self, template: Template) -> None:
        """Pruning keeps the most recently used templates."""
        with contextlib.suppress(OSError):
            os.utime(template.directory / META_NAME)

    def discard(self, template: Template) -> None:
        """Removes a template that failed; renamed away first so no reader sees it half gone."""
        doomed = self.root / f".discard-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            template.directory.rename(doomed)
        except OSError:
            return  # already discarded or replaced by another shim
        shutil.rmtree(doomed, ignore_errors=True)

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        """A private build directory, removed whatever happens (and, if this process is
        killed, by the next build: its name carries our pid)."""
        private.directory(self.root)
        self._remove_dead_builds()
        staging = self.root / f".build-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir(mode=PRIVATE_MODE)
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _remove_dead_builds(self) -> None:
        for entry in self.root.glob(".build-*"):
            _remove_if_builder_dead(entry, entry.name.split("-")[1])
        for entry in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
            _remove_if_builder_dead(entry, entry.name.removeprefix(SCRATCH_PREFIX).split("-")[0])
        for entry in self.root.glob(".discard-*"):
            shutil.rmtree(entry, ignore_errors=True)
        # Per-key locks of harpoon before 2026-11-28 (the build lock is held here).
        for entry in self.root.glob("*.lock"):
            if entry.name != BUILD_LOCK_NAME:
                entry.unlink(missing_ok=True)

    def _publish(self, staging: Path, key: str) -> Template:
        final = self.root / key
        try:
            staging.rename(final)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # A stale template of the same key is in the way: swap it out first.
            old = self.root / f".discard-{os.getpid()}-{secrets.token_hex(4)}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=final)
        return Template(key, final)

    def _prune(self, keep: Path) -> None:
        """Keeps the most recently used templates of the guest image `keep` was made from,
        and none made from files that are gone (a guest image the image cache has since
        removed): those can never be restored. Templates of other images (another
        install sharing this store) are never pruned for being old."""
        image = _image_of(keep)
        templates = []
        for directory in self.root.iterdir():
            if directory == keep or not (directory / META_NAME).is_file():
                continue
            if _made_from_missing_files(directory):
                shutil.rmtree(directory, ignore_errors=True)
            elif _image_of(directory) in (image, None):
                templates.append(directory)
        templates.sort(key=lambda p: (p / META_NAME).stat().st_mtime, reverse=True)
        for directory in templates[KEEP_TEMPLATES - 1 :]:
            shutil.rmtree(directory, ignore_errors=True)

    def building(self) -> bool:
        """Whether a process holds the build lock now (it is building a template)."""
        try:
            lock_fd = private.open_file(self.root / BUILD_LOCK_NAME, os.O_WRONLY | os.O_APPEND)
            with open(lock_fd, "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError:
            return False  # no store yet: nobody builds in it
        return False

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[None]:
        """Holds the build lock, once any other process has let it go."""
        import asyncio

        private.directory(self.root)
        with open(private.open_file(self.root / BUILD_LOCK_NAME, os.O_WRONLY), "w") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    async def build(self, config: VMConfig, backend: Backend) -> Template | None:
        """The template for config, built unless it exists (once another process's build
        is over: it may be this one); None when the backend cannot save guests. The VMs
        it starts run at config's priority and are gone when it returns or fails."""
        make_vm = backend.new_vm
        identity = backend.template_identity(config)
        if identity is None:
            return None
        key = template_key(identity)
        async with self._lock():
            existing = self.find(key)
            if existing is not None:
                return existing
            with self._staging() as staging, _vm_scratch() as scratch:
                meta = await _save_template(config, make_vm, staging, scratch / "vm")
                verify = template_config(config, staging, scratch / "verify")
                began = time.monotonic()
                vm, agent, _ = await restore(make_vm, verify, Template(key, staging))
                meta["verify_restore_s"] = round(time.monotonic() - began, 3)
                await agent.close()
                await vm.stop()
                shutil.rmtree(staging / "share", ignore_errors=True)
                meta.update(
                    format=FORMAT_VERSION,
                    key=key,
                    identity=identity,
                    image=str(config.initrd.parent),
                )
                document = json.dumps(meta, indent=1) + "\n"
                private.write_file(staging / META_NAME, document.encode())
                template = self._publish(staging, key)
        log.info("built VM template %s in %s", key, template.directory)
        return template


def _remove_if_builder_dead(directory: Path, pid: str) -> None:
    """Removes a build's directory whose name carries the pid of a builder that is gone."""
    if pid.isdigit() and not _alive(int(pid)):
        shutil.rmtree(directory, ignore_errors=True)


def _image_of(directory: Path) -> str | None:
    """The guest image (the directory of its initrd) a template was made from, as its
    meta.json says; None for a template that does not say (made before it was noted)."""
    try:
        image = json.loads((directory / META_NAME).read_text())["image"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(image)


def _made_from_missing_files(directory: Path) -> bool:
    """Whether a file the template's identity names (the VMM binary, kernel, initrd) is
    gone; False when its metadata does not say."""
    try:
        files = json.loads((directory / META_NAME).read_text())["identity"]["files"]
        return any(not os.path.exists(path) for path in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _vm_scratch() -> Iterator[Path]:
    """A short private directory for a build's VMs, removed whatever happens (and, if
    this process is killed, by the next build: its name carries our pid)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def template_config(config: VMConfig, staging: Path, state_dir: Path) -> VMConfig:
    """config with its own paths replaced: private state in state_dir, shares on an
    empty directory, disks on empty files of their own (never a container's image: a
    writable one is locked by the container's VMM, and the builder outlives it). The
    guest loads no disk driver before it is saved, so a restored VM sees only the disks
    it is given."""
    placeholder = staging / "share"
    placeholder.mkdir(mode=PRIVATE_MODE, exist_ok=True)
    disks = []
    for disk in config.disks:
        image = staging / "share" / f".disk-{disk.id}"
        image.touch(mode=0o600)
        disks.append(replace(disk, image=image))
    return replace(
        config,
        name=f"template-{staging.name}",
        state_dir=state_dir,
        shares=tuple(replace(share, host_path=placeholder) for share in config.shares),
        disks=tuple(disks),
        memory_file=staging / MEMORY_NAME,
    )


async def _save_template(
    config: VMConfig, make_vm: MakeVM, staging: Path, state_dir: Path
) -> dict[str, Any]:
    import asyncio

    vm = make_vm(template_config(config, staging, state_dir))
    began = time.monotonic()
    try:
        await vm.start()
        # Held open and silent while the guest is saved: restored guests then find a host
        # already attached and serve it as a fresh connection (see VirtualMachine).
        host_ends = [
            (await asyncio.open_unix_connection(str(path)))[1]
            for path in (vm.config.agent_socket, vm.config.stdio_socket)
        ]
        try:
            await vm.wait_for_agent_channel(BUILD_TIMEOUT_S)
            booted = time.monotonic()
            await vm.save_state(staging / STATE_NAME)
            saved = time.monotonic()
        finally:
            for host_end in host_ends:
                host_end.close()
    except TimeoutError:
        raise VMError(f"the template guest's agent did not start: {vm.console_tail()}") from None
    finally:
        await vm.stop()
    # On disk before it is published: a template outlives reboots, and a torn memory
    # file would restore into a corrupt guest.
    for name in (STATE_NAME, MEMORY_NAME):
        await asyncio.to_thread(_fsync, staging / name)
    return {
        "boot_s": round(booted - began, 3),
        "save_s": round(saved - booted, 3),
        "state_bytes": (staging / STATE_NAME).stat().st_size,
        "memory_bytes": (staging / MEMORY_NAME).stat().st_size,
        "created": time.time(),
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore_config(config: VMConfig, template: Template) -> VMConfig:
    """The configuration of a VM of config restored from template."""
    return replace(config, memory_file=template.memory)


async def restore(
    make_vm: MakeVM, config: VMConfig, template: Template, resumed: asyncio.Event | None = None
) -> tuple[VirtualMachine, AgentClient, agent_pb2.HelloResponse]:
    """A VM continued from `template`, its agent connected and answering Hello (which sets
    the guest clock, stopped since the save, and reseeds its entropy pool); raises (and
    leaves nothing running) when the agent does not answer within RESTORE_HELLO_TIMEOUT_S.
    `resumed` is set once the guest is on its way (loading, then running)."""
    import asyncio

    from harpoon.sandbox.ports import connect_ports

    config = restore_config(config, template)
    vm = make_vm(config)
    ports: tuple[Port, Port | None] | None = None
    agent: AgentClient | None = None
    began = time.monotonic()
    try:
        await vm.restore(template.state)
        launched = time.monotonic()
        # The host ends first: the guest must find its host attached when it runs.
        ports = await connect_ports(str(config.agent_socket), str(config.stdio_socket))
        await vm.resume()
        if resumed is not None:
            resumed.set()
        resumed_at = time.monotonic()
        # Loaded while the guest loads and its agent wakes up (~0.1 s under TCG).
        from harpoon.sandbox.agent_client import AgentClient

        agent = AgentClient.over(*ports)
        left_s = RESTORE_HELLO_TIMEOUT_S - (time.monotonic() - resumed_at)
        response = await asyncio.wait_for(
            agent.hello(RESTORE_CALL_TIMEOUT_S, warm_up=vm.emulated), left_s
        )
        log.debug(
            "restore of %s: launch %.0f ms, connect + migrate-incoming %.0f ms, Hello %.0f ms",
            config.name, (launched - began) * 1e3, (resumed_at - launched) * 1e3,
            (time.monotonic() - resumed_at) * 1e3,
        )  # fmt: skip
        return vm, agent, response
    except Exception as error:
        refused = await _refused(vm)
        await _abandon(vm, agent, ports)
        if refused is not None:
            raise TemplateRefused(
                f"{config.name}: the VMM exited with status {refused} loading template "
                f"{template.key} ({error}): {vm.console_tail()}"
            ) from error
        raise
    except BaseException:
        await _abandon(vm, agent, ports)
        raise


async def _refused(vm: VirtualMachine) -> int | None:
    """The VMM's exit status if it exited on its own with an error (not by a signal)."""
    import asyncio

    with contextlib.suppress(TimeoutError, VMError):
        await asyncio.wait_for(vm.wait(), REFUSAL_EXIT_WAIT_S)
    status = vm.exit_status
    return status if status is not None and status > 0 else None


async def _abandon(
    vm: VirtualMachine, agent: AgentClient | None, ports: tuple[Port, Port | None] | None
) -> None:
    if agent is not None:
        with contextlib.suppress(Exception):
            await agent.close()
    elif ports is not None:
        for port in ports:
            if port is not None:
                port[1].close()
    await vm.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
