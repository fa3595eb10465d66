"""The VM template a cold-booted container was missing, built by a process of its own.

A shim exits with its container, and containers are often shorter than a template
build (`ctr run --rm … echo hi` lasts a fraction of one under TCG): a build inside the
shim was cancelled with it, so a user who only ran short containers booted cold every
time. The shim therefore hands the build to this module, run as a detached process
(its own session, no stdio of the shim's, no files of containerd's) that outlives it:
`python -m harpoon.sandbox.template_builder` with the VM's configuration as JSON.

It builds at the lowest CPU priority; when another process holds the store's build lock
it waits for it, and then finds the template built or builds it. It ends with the
build: its VMs die with it and its staging directory goes with the build
(TemplateStore.build). What it did goes to BUILD_LOG_NAME in the template store, since
no shim is left to log it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harpoon import private
from harpoon.vmm.base import LOWEST_PRIORITY_NICE, VMConfig
from harpoon.vmm.devices import NIC, Disk, NicBackend, Share, StreamBackend, TapBackend, Vsock
from harpoon.vmm.process import VmmProcess

BUILD_LOG_NAME = "build.log"
MAX_BUILD_LOG_BYTES = 1 << 20

log = logging.getLogger(__name__)


def config_to_json(config: VMConfig, backend: str) -> str:
    """config (every field, devices included) and the backend's name, as JSON."""
    return json.dumps({"backend": backend, "config": _plain(dataclasses.asdict(config))})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def config_from_json(text: str) -> tuple[VMConfig, str]:
    """The VMConfig and backend name config_to_json wrote; ValueError (DeviceError
    included) for anything else."""
    try:
        document = json.loads(text)
        fields = dict(document["config"])
        paths = {"kernel", "initrd", "state_dir", "memory_file", "netns"}
        for name in paths & fields.keys():
            fields[name] = None if fields[name] is None else Path(fields[name])
        fields["shares"] = tuple(
            Share(s["tag"], Path(s["host_path"]), s["fs"], bool(s["read_only"]))
            for s in fields["shares"]
        )
        fields["disks"] = tuple(
            Disk(d["id"], Path(d["image"]), bool(d["read_only"])) for d in fields["disks"]
        )
        fields["nics"] = tuple(_nic(n) for n in fields["nics"])
        fields["vsock"] = None if fields["vsock"] is None else Vsock(int(fields["vsock"]["cid"]))
        fields["kernel_args"] = tuple(fields["kernel_args"])
        return VMConfig(**fields), str(document["backend"])
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a VM configuration: {error!r}") from None


def _nic(fields: dict[str, Any]) -> NIC:
    backend = fields["backend"]
    kind: NicBackend = (
        TapBackend(backend["ifname"])
        if "ifname" in backend
        else StreamBackend(Path(backend["socket"]), bool(backend.get("gvproxy", False)))
    )
    return NIC(fields["id"], fields["mac"], kind)


def spawn(config: VMConfig, backend: str, store_root: Path) -> VmmProcess:
    """Starts the detached builder of config's template in store_root. Whoever holds
    the process may wait for it (and so reap it); once the caller exits, init does."""
    private.directory(store_root)
    log_path = store_root / BUILD_LOG_NAME
    try:
        # Appended to, so a failure stays next to the builds before it; started afresh
        # once it is large, so it never grows without end.
        mode = os.O_TRUNC if log_path.stat().st_size > MAX_BUILD_LOG_BYTES else os.O_APPEND
    except FileNotFoundError:
        mode = os.O_APPEND
    # Root's alone, as the store is (harpoon.private): it quotes the guest's console.
    with open(private.open_file(log_path, os.O_WRONLY | mode), "ab") as build_log:
        popen = subprocess.Popen(
            [sys.executable, "-m", __name__, str(store_root), config_to_json(config, backend)],
            stdin=subprocess.DEVNULL,
            stdout=build_log,
            stderr=build_log,
            start_new_session=True,  # nothing meant for the shim's session reaches it
            cwd="/",  # not the bundle containerd removes
        )
    log.info("building the VM template for %s in process %d", config.name, popen.pid)
    return VmmProcess(popen)


def build(config: VMConfig, backend: str, store_root: Path) -> int:
    """The builder's work: 0 when the template exists (built now or before); 1 when
    the build failed."""
    import asyncio

    from harpoon.net.netns import NetnsError
    from harpoon.sandbox.template import TemplateStore
    from harpoon.vmm.backend import backend_named
    from harpoon.vmm.base import VMError

    try:
        with scratch_netns(config) as built_in:
            store = TemplateStore(store_root)
            built = asyncio.run(store.build(built_in, backend_named(backend)))
    except (VMError, OSError, TimeoutError, ValueError, NetnsError) as error:
        log.warning("building a VM template for %s failed: %s", config.name, error)
        return 1
    if built is None:
        log.warning("no VM template for %s: %s cannot save guests, or the guest's "
                    "files are gone (see above)", config.name, backend)  # fmt: skip
        return 1
    return 0


@contextlib.contextmanager
def scratch_netns(config: VMConfig) -> Iterator[VMConfig]:
    """config, run in a network namespace of the build's own with its taps: the
    container's namespace, where its VM's taps are, may be gone before the build ends,
    and the template VM must never share a tap with a running one."""
    if not any(isinstance(nic.backend, TapBackend) for nic in config.nics):
        yield config
        return
    from harpoon.net import netns, wire

    scratch = config.state_dir.parent.parent / "netns" / f"template-{os.getpid()}"
    wire.prepare(scratch, owned=True)
    try:
        yield dataclasses.replace(config, netns=scratch)
    finally:
        netns.remove(scratch)


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s pid=%(process)d %(levelname)s %(message)s"
    )
    if len(argv) != 2:
        log.error("usage: python -m %s STORE_ROOT CONFIG_JSON", __name__)
        return 2
    os.nice(LOWEST_PRIORITY_NICE)
    try:
        config, backend = config_from_json(argv[1])
    except ValueError as error:
        log.error("%s", error)
        return 2
    return build(config, backend, Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
