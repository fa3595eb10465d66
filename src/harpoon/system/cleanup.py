"""What a stopped or crashed containerd leaves behind, removed: run with the services
stopped (`harpoon system stop`, and `start` when containerd is not running).

containerd does not stop its shims when it exits, and a SIGKILLed containerd leaves its
task bundles: each shim keeps its VM running. This does what containerd would have done
for each (harpoon.devenv.containerd's test daemon does the same at its stop): kills the
shims serving harpoon's socket and everything below them; runs
`containerd-shim-harpoon-v1 delete` for each harpoon bundle (the VM, rootfs, netns,
state and socket, and the poststop hooks the dead shim did not run: nerdctl's CNI
teardown, as runc's `delete --force` runs them); deletes runc's containers of those
bundles;
kills what still names harpoon's run or state directory on its command line (a VM, a
gvproxy or a virtiofsd whose shim is gone; a template builder of a store under the
root); unmounts everything under those directories; removes the network namespaces'
pins, the VMs' directories, host-local's reservations, the default network's bridge
and its iptables rules, the task bundles, the sockets and the pid files.

buildkitd's step containers live in a namespace of their own (harpoon.system.buildkitd
says why): `release_step_containers`, run while containerd answers and no buildkitd
runs, deletes every container there with its task (the shim tears its VM down);
`after_stop`'s bundles cover the steps' tasks when containerd is gone too.

It acts only on what names harpoon's own directories or socket, never on a process by
its name alone: another harpoon root, a system containerd and their containers on the
same machine are not touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from harpoon.devenv.containerd import TASK_BUNDLES, delete_harpoon_task
from harpoon.devenv.host import (
    ShimProcess,
    delete_runc_containers_under,
    is_under,
    kill_process_trees,
    mount_points,
    remove_cgroups,
    shim_processes,
    unmount_under,
)
from harpoon.system import config
from harpoon.system.layout import BUILDKIT_NAMESPACE, Layout
from harpoon.system.network import NETWORK_NAME

HARPOON_SHIM = "containerd-shim-harpoon"
#: A detached template builder's module (harpoon.sandbox.template_builder).
TEMPLATE_BUILDER = "harpoon.sandbox.template_builder"
#: What host-local keeps in a network's directory besides reservations.
HOST_LOCAL_BOOKKEEPING = ("lock", "last_reserved_ip.")
#: The run directory's entries that hold one directory per VM or container.
VM_DIRECTORIES = ("vm", "share", "netns")


def _bundles(layout: Layout) -> list[Path]:
    return sorted(p for p in layout.containerd_state.glob(f"{TASK_BUNDLES}/*/*") if p.is_dir())


def _is_harpoon_bundle(bundle: Path) -> bool:
    """containerd (1.7 on) records the shim binary it ran in the bundle; a bundle
    without the record may be harpoon's (delete is harmless for others)."""
    try:
        return HARPOON_SHIM in (bundle / "shim-binary-path").read_text()
    except OSError:
        return True


def _spec(bundle: Path) -> dict[str, object]:
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def processes_naming(directory: Path) -> list[ShimProcess]:
    """Live processes whose command line names the directory or a path under it (their
    environment is not read: a shell that exported HARPOON_ROOT is not ours)."""
    from harpoon.devenv.host import _pids, _read_argv, alive

    mine = {os.getpid(), os.getppid()}
    found = []
    for pid in _pids():
        argv = _read_argv(pid)
        if pid in mine or argv is None or not alive(pid):
            continue
        if any(is_under(arg, directory) or f"{directory}/" in arg for arg in argv):
            found.append(ShimProcess(pid, argv))
    return found


def _template_builders(directory: Path) -> list[ShimProcess]:
    return [p for p in processes_naming(directory) if TEMPLATE_BUILDER in p.argv]


def _remove_reservations(layout: Layout) -> list[str]:
    """host-local's address reservations of the default network: every container is
    gone, so every one left is a leak."""
    directory = layout.cni_ipam_dir / NETWORK_NAME
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if not entry.name.startswith(HOST_LOCAL_BOOKKEEPING):
                entry.unlink()
                removed.append(str(entry))
    return removed


def _remove_default_bridge(layout: Layout) -> list[str]:
    """The default network's bridge and its rules (CNI's bridge plugin makes it at the
    first container and no plugin removes it): every container is gone."""
    from harpoon.devenv.cni import remove_bridge
    from harpoon.system import network

    chosen = network.read(layout.cni_netconf_dir)
    if chosen is None:
        return []
    return [f"removed {what}" for what in remove_bridge(chosen.bridge)]


def _mounted_under(directory: Path) -> bool:
    return any(is_under(point, directory) for point in mount_points())


def _remove_tree(directory: Path) -> bool:
    """Removes a directory unless something is still mounted under it (rmtree would go
    into the mount and delete what is there: a container's image layers)."""
    if not directory.exists() or _mounted_under(directory):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def _remove_entry(entry: Path) -> bool:
    if entry.is_dir() and not entry.is_symlink():
        return _remove_tree(entry)
    with contextlib.suppress(OSError):
        entry.unlink()
        return True
    return False


def _remove_sockets(layout: Layout) -> list[str]:
    """The sockets left in the services' directories (a killed containerd's; under a
    root of its own, anything's in the run directory)."""
    tops = [layout.run] if layout.exclusive else [layout.containerd_state, layout.services_dir]
    removed = []
    for top in tops:
        for path in top.rglob("*") if top.is_dir() else ():
            with contextlib.suppress(OSError):
                if path.is_socket() and not path.is_symlink():
                    path.unlink()
                    removed.append(str(path))
    return removed


def _kill(processes: list[ShimProcess], why: str, progress: Callable[[str], None]) -> list[str]:
    if not processes:
        return []
    progress(f"killing {len(processes)} {why}")
    killed, _ = kill_process_trees(processes)
    return [f"killed pid {pid}" for pid in killed]


def _release_tasks(layout: Layout, progress: Callable[[str], None]) -> list[str]:
    """What containerd would have done for each of its tasks whose shim it lost."""
    address = str(layout.containerd_socket)
    shims = [p for p in shim_processes() if p.flag("address") == address]
    acted = _kill(shims, "shim(s) containerd left running", progress)
    bundles = _bundles(layout)
    for bundle in bundles:
        if _is_harpoon_bundle(bundle):
            # The shim's delete runs the poststop hooks its daemon did not get to.
            delete_harpoon_task(address, bundle)
        acted.append(f"deleted task {bundle.parent.name}/{bundle.name}")
    deleted = delete_runc_containers_under(layout.containerd_state)
    acted += [f"deleted runc container {c}" for c in deleted]
    limits = [_spec(b).get("linux") for b in bundles]
    remove_cgroups([c["cgroupsPath"] for c in limits
                    if isinstance(c, dict) and isinstance(c.get("cgroupsPath"), str)])  # fmt: skip
    acted += [f"unmounted {point}" for point in unmount_under(layout.containerd_state)]
    for bundle in bundles:
        _remove_tree(bundle)
    return acted


def _sweep_run_dir(layout: Layout, progress: Callable[[str], None]) -> list[str]:
    """Under a root of its own, whatever names the run directory is this harpoon's (a
    VM, gvproxy or virtiofsd whose shim is gone), and so is a template builder of its
    state's store. (/run/harpoon is shared with a system containerd's harpoon shims.)"""
    leftovers = processes_naming(layout.run) + _template_builders(layout.state)
    acted = _kill(leftovers, f"process(es) left naming {layout.run}", progress)
    acted += [f"unmounted {point}" for point in unmount_under(layout.run)]
    for name in VM_DIRECTORIES:
        for entry in sorted((layout.run / name).glob("*")):
            acted += [f"removed {entry}"] if _remove_entry(entry) else []
    return acted


def release_step_containers(layout: Layout, choice: config.ContainerdChoice) -> list[str]:
    """Deletes every container of buildkitd's namespace and its task (`ctr task delete
    --force` kills it first): a killed buildkitd's steps, their VMs running on. Run only
    while no buildkitd runs on the layout; returns what it deleted."""
    listed = config.ctr(choice, layout, "containers", "ls", "-q", namespace=BUILDKIT_NAMESPACE)
    deleted = []
    for container in listed.stdout.split() if listed.returncode == 0 else ():
        config.ctr(choice, layout, "tasks", "delete", "--force", container,
                   namespace=BUILDKIT_NAMESPACE)  # fmt: skip
        config.ctr(choice, layout, "containers", "delete", container,
                   namespace=BUILDKIT_NAMESPACE)  # fmt: skip
        deleted.append(f"step container {BUILDKIT_NAMESPACE}/{container}")
    return deleted


def after_stop(layout: Layout, progress: Callable[[str], None] = lambda _: None) -> list[str]:
    """Removes what the stopped services left; returns what it had to act on (empty
    after a clean stop)."""
    acted = _release_tasks(layout, progress)
    if layout.exclusive:
        acted += _sweep_run_dir(layout, progress)
    acted += [f"released address {r}" for r in _remove_reservations(layout)]
    acted += _remove_default_bridge(layout)
    acted += [f"removed socket {s}" for s in _remove_sockets(layout)]
    for pid_file in layout.services_dir.glob("*.pid"):
        pid_file.unlink(missing_ok=True)
    return acted
