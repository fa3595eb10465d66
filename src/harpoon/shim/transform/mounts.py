"""The spec's mounts: kernel filesystems are crun's to mount in the guest as they are;
host paths bound into the container go through the VM's share (harpoon.sandbox.binds),
or, on a host that cannot bind mount, through shares of their own
(harpoon.sandbox.bind_shares).

A bind mount (`type: bind`, or any type with a `bind`/`rbind` option: nerdctl's `-v`
arrives as `type: none` with `rbind`) keeps its destination and options in the guest's
spec; its source becomes where the guest sees it: the share's mount point for it, which
the host binds at Create, or its path in its own share, which the guest mounts at
Create. What cannot cross the VM boundary is refused at plan time, naming the mount,
so no VM is launched for it:

- a source that does not exist (as runc refuses it);
- a unix socket (a socket is a host kernel object: the guest could not connect to it),
  unless its destination is one the workload can do without (SKIPPABLE_SOCKETS): that
  mount is left out, with a warning;
- a mount type that names neither a kernel filesystem nor a bind.

A character or block device bound from the host (`-v /dev/null:/x`) is the guest's
device of the same path: a device node names a driver of the kernel that opens it.

Planning reads the sources' types (stat; and resolves them, for shares of their own):
the one I/O of a plan, needed to refuse before any VM starts.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon.errdefs import FailedPrecondition, InvalidArgument, Unimplemented
from harpoon.sandbox import bind_shares
from harpoon.sandbox.bind_shares import BindShare
from harpoon.sandbox.binds import HostBind
from harpoon.shim.transform.draft import CreateContext, Draft, Transformer

if TYPE_CHECKING:
    from harpoon.sandbox.sandbox import Sandbox

# Mount types that name a kernel filesystem, not a host path (their source is a label).
KERNEL_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm", "bpf",
     "securityfs", "debugfs", "tracefs", "configfs", "fusectl", "hugetlbfs", "ramfs"}
)  # fmt: skip
# Socket mounts left out rather than refused, and why the workload does without them.
SKIPPABLE_SOCKETS = {
    "/dev/otel-grpc.sock": "BuildKit's OpenTelemetry socket: a RUN step only sends "
    "traces of itself there, and runs the same without it",
}

log = logging.getLogger(__name__)


def is_bind_mount(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in ("bind", "rbind") or "bind" in options or "rbind" in options


def _describe(mount: dict[str, Any]) -> str:
    return (
        f"mount of {mount.get('source', '')!r} at {mount.get('destination', '')!r} "
        f"(type {mount.get('type') or 'none'!r})"
    )


def _source(mount: dict[str, Any], bundle_dir: Path | None) -> Path:
    source = mount.get("source")
    if not isinstance(source, str) or not source:
        raise InvalidArgument(f"{_describe(mount)}: a bind mount needs a source path")
    path = Path(source)
    if not path.is_absolute():
        if bundle_dir is None:
            raise InvalidArgument(f"{_describe(mount)}: the source path is not absolute")
        path = bundle_dir / path  # runc's rule: relative to the bundle
    return path


def readonly(options: list[str]) -> bool:
    """Whether mount options make a mount read-only: the last of `ro` and `rw` wins, as
    crun reads them."""
    flags = [option for option in options if option in ("ro", "rw")]
    return bool(flags) and flags[-1] == "ro"


def plan_bind(
    mount: dict[str, Any],
    index: int,
    bundle_dir: Path | None,
    shares: list[BindShare] | None = None,
) -> tuple[bool, HostBind | None]:
    """Whether a bind mount stays in the guest's spec, and the host bind it needs (if
    any); rewrites the mount's source to where the guest sees it. With `shares` (binds
    as shares of their own), the source's share is added there instead (if it is new)
    and no host bind is needed."""
    source = _source(mount, bundle_dir)
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise FailedPrecondition(f"{_describe(mount)}: the source does not exist") from None
    except OSError as error:
        raise FailedPrecondition(f"{_describe(mount)}: {error.strerror}") from None
    if stat.S_ISSOCK(mode):
        reason = SKIPPABLE_SOCKETS.get(mount.get("destination", ""))
        if reason is None:
            raise Unimplemented(
                f"{_describe(mount)}: a unix socket cannot cross into the VM "
                f"(only {sorted(SKIPPABLE_SOCKETS)} are left out instead)"
            )
        log.warning("leaving out the %s: %s", _describe(mount), reason)
        return False, None
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        mount["source"] = str(source)  # the guest's own device of that path
        return True, None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise Unimplemented(f"{_describe(mount)}: cannot share a {stat.filemode(mode)[0]} file")
    options = mount.get("options") or []
    recursive = "rbind" in options or mount.get("type") == "rbind"
    mount["type"] = "bind"
    if shares is not None:
        share, mount["source"] = bind_shares.plan_bind(
            shares, source, stat.S_ISDIR(mode), readonly(options)
        )
        if share not in shares:
            shares.append(share)
        return True, None
    bind = HostBind(
        index=index,
        source=source,
        directory=stat.S_ISDIR(mode),
        readonly=readonly(options),
        recursive=recursive,
    )
    mount["source"] = bind.guest_path
    return True, bind


class Mounts(Transformer):
    def plan(self, draft: Draft) -> None:
        kept = []
        shares = draft.bind_shares if bind_shares.enabled() else None
        for mount in draft.guest_spec.get("mounts") or []:
            if not is_bind_mount(mount):
                if mount.get("type") not in KERNEL_FILESYSTEMS:
                    raise Unimplemented(f"harpoon cannot serve the {_describe(mount)}")
                kept.append(mount)
                continue
            keep, bind = plan_bind(mount, len(draft.binds), draft.bundle_dir, shares)
            if bind is not None:
                draft.binds.append(bind)
            if keep:
                kept.append(mount)
        if draft.guest_spec.get("mounts") is not None:
            draft.guest_spec["mounts"] = kept
        draft.shares.extend(share.device() for share in draft.bind_shares)

    async def with_vm(self, create: CreateContext, sandbox: Sandbox) -> None:
        # Undone by the sandbox's stop, which releases its whole share; the guest's
        # mounts of bind shares end with the VM.
        sandbox.share_binds(create.binds)
        await sandbox.mount_bind_shares(create.bind_shares)
