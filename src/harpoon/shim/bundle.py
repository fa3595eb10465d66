"""The OCI bundle containerd hands the shim: config.json, and rootfs mounts to make.

On Linux the shim mounts containerd's (unmounted) snapshot mounts at <bundle>/rootfs,
as runc's shim does, and shares that directory into the VM. With no mounts the spec's
root.path is the root as it stands (`ctr run --rootfs DIR`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harpoon import linux
from harpoon.errdefs import InvalidArgument

if TYPE_CHECKING:  # protobuf is not loaded yet when the VM is started from the bundle
    from harpoon.api.containerd.types import mount_pb2


@dataclass(frozen=True)
class Bundle:
    path: Path
    spec: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        bundle = Path(path)
        config = bundle / "config.json"
        try:
            spec = json.loads(config.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"bundle {bundle} has no config.json") from None
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"{config} is not valid JSON: {error}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
            raise InvalidArgument(f"{config} has no process to run")
        if not spec["process"].get("args"):
            raise InvalidArgument(f"{config}: process.args is empty")
        return cls(bundle, spec)

    @property
    def rootfs(self) -> Path:
        root = Path(self.spec.get("root", {}).get("path", "rootfs"))
        return root if root.is_absolute() else self.path / root

    @property
    def process(self) -> dict[str, Any]:
        process: dict[str, Any] = self.spec["process"]
        return process


def mount_rootfs(target: Path, mounts: list[mount_pb2.Mount]) -> None:
    """Mounts containerd's snapshot mounts, in order, at target; undone on failure."""
    target.mkdir(mode=0o711, exist_ok=True)
    try:
        for mount in mounts:
            linux.mount_with_options(mount.source, str(target), mount.type, list(mount.options))
    except OSError as error:
        linux.unmount_all(str(target))
        raise InvalidArgument(f"cannot mount the rootfs at {target}: {error}") from None


def unmount_rootfs(target: Path) -> None:
    linux.unmount_all(str(target))
