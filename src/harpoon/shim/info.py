"""`shim -info`: the containerd.types.RuntimeInfo this runtime describes itself with."""

from __future__ import annotations

import sys

from harpoon import __version__
from harpoon.api.containerd.types import introspection_pb2
from harpoon.shim.cli import RUNTIME_NAME

#: containerd >= 2.2 reads this annotation of the -info answer (core/runtime/v2
#: shim_manager.go `loadShimInfo`, split on ","): the mount types the shim handles
#: itself, which its mount manager then leaves to the shim (task_manager.go `Create` ->
#: `mounts.Activate(..., WithAllowMountType)`).
ALLOW_MOUNTS_ANNOTATION = "containerd.io/runtime-allow-mounts"

#: What harpoon mounts itself, in the guest: erofs layers (attached as disks) and the
#: `format/` and `mkdir/` transforms of the erofs snapshotter's overlay description
#: (`{{ mount N }}` templates and directories on the writable image). `mkfs/` is left to
#: containerd, which formats the writable ext4 image on the host (mkfs.ext4, no mount)
#: and hands it over as an `ext4` mount, which it has no handler for either. The same
#: set as nerdbox's. Snapshotters that give plain `overlay`/`bind` mounts are unaffected.
ALLOWED_MOUNT_TYPES = ("mkdir/*", "format/*", "erofs")


def runtime_info() -> introspection_pb2.RuntimeInfo:
    return introspection_pb2.RuntimeInfo(
        name=RUNTIME_NAME,
        version=introspection_pb2.RuntimeVersion(version=__version__),
        annotations={ALLOW_MOUNTS_ANNOTATION: ",".join(ALLOWED_MOUNT_TYPES)},
    )


def write_info() -> None:
    if not sys.stdin.isatty():
        sys.stdin.buffer.read()  # optional runtime options; nothing in them changes the answer
    sys.stdout.buffer.write(runtime_info().SerializeToString())
    sys.stdout.flush()
