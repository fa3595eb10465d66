"""A spec written on a host that is not Linux, made into the Linux spec the guest runs.

containerd's `oci.WithDefaultSpec()` starts from the *host's* platform (containerd
pkg/oci/spec.go `generateDefaultSpecWithPlatform`): on macOS `populateDefaultDarwinSpec`
gives ociVersion, `root: {path: ""}` and process.cwd alone, and nerdctl's darwin
`setPlatformOptions` adds nothing (nerdctl pkg/cmd/container/run_unix_nolinux.go). So a
config.json from nerdctl on a Mac has no `linux` section: no namespaces, no /proc, /dev
or /sys, no capabilities. (`ctr run` forces a Linux spec on a non-Linux host: its
specs are Linux specs.) What nerdctl adds keeps darwin's shapes:

- `-v SRC:DST[:ro]` is a mount with darwin's DefaultMountType `""`, which Go's
  `omitempty` leaves out of the JSON, and options `["rbind"]` or `["ro", "rbind"]`
  (nerdctl pkg/mountutil/mountutil.go ProcessFlagV, mountutil_darwin.go);
- `--network host` binds its resolv.conf and hosts as `type: bind` with options
  `["bind", ""]` (darwin's DefaultPropagationMode is `""`), and removes the network
  namespace with `oci.WithHostNamespace`, which on a darwin spec leaves an *empty*
  `linux: {}` (nerdctl pkg/containerutil/container_network_manager.go; containerd
  pkg/oci/spec_opts.go setLinux). `--network none` binds nothing on darwin;
- `-t` sets process.terminal without TERM (WithTTY adds TERM=xterm to Linux specs only);
- `--hostname` only reaches the `nerdctl/hostname` annotation (the spec's hostname and
  /etc/hostname are set on Linux only).

A spec is taken as such when its `linux` is absent or empty: a Linux client's always
holds namespaces at least. Every other spec is left exactly as it is. The Linux parts
are containerd's own defaults (populateDefaultUnixSpec, defaultMounts), as DEFAULTS
here says, with what nerdctl's Linux setPlatformOptions changes in them (run_linux.go):
no tmpfs on /run (an image's /run stays visible, nerdctl #157) and cgroup2 at
/sys/fs/cgroup read-only. An empty `linux` gets no network namespace: that is what
`--network host` asked. Mounts: containerd's defaults first, less those the spec's own
replace (same destination, or anything under /dev if it mounts /dev), then the spec's,
ordered by depth as nerdctl orders them (run_mount.go withMounts); `type: ""` with a
bind option becomes `type: bind`, and empty options are dropped.

This runs first in the pipeline, before the transformers that read the guest spec's
namespaces and mounts. The network transformer reads the spec as containerd wrote it
(harpoon.shim.transform.network): with no network namespace there, the VM gets
harpoon's user-mode network, the only one a Mac has (it has no network namespaces to
put a VM in). The container is in a namespace of its own in the guest (`--network
none`: loopback alone; the `io.harpoon.network.ports` annotation publishes ports into
it), or shares the guest's (`--network host`).
"""

from __future__ import annotations

import copy
import posixpath
from typing import Any

from harpoon.errdefs import InvalidArgument
from harpoon.shim.transform.draft import Draft, Transformer

_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip

#: The Linux defaults, in config.json's own words: containerd pkg/oci/spec.go
#: populateDefaultUnixSpec and pkg/oci/mounts.go defaultMounts (v2.4.0-beta), with
#: nerdctl's Linux changes to the mounts (see the module's docstring). cgroupsPath is
#: not here: the guest's is harpoon's own (harpoon.shim.transform.guest_runtime).
DEFAULTS: dict[str, Any] = {
    "root": {"path": "rootfs"},
    "process": {
        "user": {"uid": 0, "gid": 0},
        "noNewPrivileges": True,
        "capabilities": {
            "bounding": _CAPABILITIES,
            "permitted": _CAPABILITIES,
            "effective": _CAPABILITIES,
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
    },
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["ro", "nosuid", "noexec", "nodev"]},
    ],
    "linux": {
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
            "/sys/devices/virtual/powercap", "/proc/scsi",
        ],
        "readonlyPaths": [
            "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
        ],
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network"},
        ],
    },
}  # fmt: skip
#: Where nerdctl keeps `--hostname` when the spec cannot (nerdctl pkg/labels).
HOSTNAME_ANNOTATION = "nerdctl/hostname"
_BIND_OPTIONS = ("bind", "rbind")


def made_elsewhere(spec: dict[str, Any]) -> bool:
    """The spec was written for a host that is not Linux: no `linux`, or an empty one."""
    return not spec.get("linux")


def _describe(mount: dict[str, Any]) -> str:
    return f"mount of {mount.get('source', '')!r} at {mount.get('destination', '')!r}"


def _typed(mount: dict[str, Any]) -> dict[str, Any]:
    """The mount with empty options dropped and darwin's untyped bind typed."""
    mount = dict(mount)
    if "options" in mount:
        mount["options"] = [option for option in mount["options"] or [] if option]
    if mount.get("type"):
        return mount
    if not any(option in _BIND_OPTIONS for option in mount.get("options") or []):
        raise InvalidArgument(
            f"{_describe(mount)} has no type and options {mount.get('options') or []}: "
            "a mount without a type must be a bind (option bind or rbind)"
        )
    mount["type"] = "bind"
    return mount


def _depth(mount: dict[str, Any]) -> int:
    return posixpath.normpath(mount.get("destination") or "/").count("/")


def linux_mounts(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """containerd's default mounts the spec's own do not replace, then the spec's, by
    depth (nerdctl run_mount.go withMounts: a stable sort on the number of slashes)."""
    given = [_typed(mount) for mount in mounts]
    replaced = {posixpath.normpath(m.get("destination") or "") for m in given}
    kept = [
        copy.deepcopy(mount)
        for mount in DEFAULTS["mounts"]
        if mount["destination"] not in replaced
        and not ("/dev" in replaced and mount["destination"].startswith("/dev/"))
    ]
    return sorted(kept + given, key=_depth)


def _linux_process(process: dict[str, Any]) -> dict[str, Any]:
    process = {**copy.deepcopy(DEFAULTS["process"]), **process}
    env = list(process.get("env") or [])
    if process.get("terminal") and not any(item.startswith("TERM=") for item in env):
        process["env"] = [*env, "TERM=xterm"]  # containerd pkg/oci WithTTY, on Linux
    return process


class LinuxDefaults(Transformer):
    def plan(self, draft: Draft) -> None:
        guest = draft.guest_spec
        if not made_elsewhere(guest):
            return
        host_network = isinstance(guest.get("linux"), dict)  # the empty linux: see above
        linux = copy.deepcopy(DEFAULTS["linux"])
        if host_network:
            linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
        guest["linux"] = linux
        guest["process"] = _linux_process(guest.get("process") or {})
        root = guest.get("root") or {}
        guest["root"] = {**root, "path": root.get("path") or DEFAULTS["root"]["path"]}
        guest["mounts"] = linux_mounts(list(guest.get("mounts") or []))
        annotations = guest.get("annotations") or {}
        hostname = annotations.get(HOSTNAME_ANNOTATION) if isinstance(annotations, dict) else None
        if hostname and isinstance(hostname, str) and not guest.get("hostname"):
            guest["hostname"] = hostname
