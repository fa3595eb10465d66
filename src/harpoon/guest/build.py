"""Build the guest image (kernel + initramfs) for amd64 or arm64 from Debian packages.

`build_guest` reads the exact package versions from the repo's lock (harpoon.guest.lock;
`refresh` re-resolves them), computes the content digest of every input, and returns at
once when that image exists. Otherwise it downloads the .debs (with apt where there is
apt, else in Python: harpoon.guest.mirror; the same files either way), unpacks them,
extracts a bootable kernel, picks kernel modules in load order (signatures stripped),
measures the agent's Python closure, adds protobuf's upb extension and crun, resolves
the shared libraries of every ELF file it ships (once each), and writes two initramfs:
the agent's, and a busybox-only "floor" one (prints `FLOOR_MARKER`, powers off) that is
the boot-time baseline. This module decides *what* goes in the image; the formats live
in `initramfs`, `kernel`, `debian` and `python_runtime`.

The guest's /init contract is in `INIT_SCRIPT`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harpoon
from harpoon.agent import boot
from harpoon.guest import cache, debian, initramfs, kernel, mirror, python_runtime
from harpoon.guest import lock as locks
from harpoon.guest.cache import GuestImage

# Bump when the builder changes what it puts in an image for the same inputs.
FORMAT_VERSION = 5

SELFTEST_MARKER = boot.SELFTEST_MARKER
FLOOR_MARKER = "HARPOON-FLOOR-READY"
AGENT_ENTRY = "harpoon.agent.main"
BOOT_ENTRY = "harpoon.agent.boot"
PROTOBUF_PROJECT = "protobuf"
# protobuf's C implementation in its binary wheels (manylinux: glibc, libstdc++).
UPB_EXTENSION = "google/_upb/_message.abi3.so"
WHEEL_PLATFORM = {"amd64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
WHEEL_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
PIP_TIMEOUT_S = 300
# Uncompressed boots faster under TCG (see the measurements in the module's tests/report);
# the kernel accepts either.
INITRD_COMPRESSION = "none"

# The Debian suites the packages are resolved from (the lock records which one each
# version came from: the index that vouches for it when fetched without apt).
DEBIAN_SUITES: tuple[str, ...] = ("bookworm", "bookworm-updates", "bookworm-security")
# How .debs are fetched: "apt" (apt-get, private state) or "python" (harpoon.guest.mirror);
# unset: apt where apt-get and apt-cache are on PATH, else Python.
FETCH_ENV = "HARPOON_GUEST_FETCH"
FETCH_METHODS = ("apt", "python")

KERNEL_METAPACKAGE = {"amd64": "linux-image-amd64", "arm64": "linux-image-arm64"}
KERNEL_PACKAGE_PATTERN = {
    "amd64": r"linux-image-6\.\d+\.\d+-\d+-amd64(-unsigned)?",
    "arm64": r"linux-image-6\.\d+\.\d+-\d+-arm64(-unsigned)?",
}
BASE_PACKAGES: tuple[str, ...] = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
)
# The OCI runtime the agent runs containers with, and the packages holding every shared
# library in its closure (crun -> libsystemd0 -> libgcrypt20...). Its libraries are
# resolved from the unpacked tree together with Python's, so libc is shipped once.
OCI_RUNTIME_PACKAGES: tuple[str, ...] = (
    "crun",
    "libcap2",
    "libseccomp2",
    "libyajl2",
    "libsystemd0",
    "libgcrypt20",
    "libgpg-error0",
    "liblzma5",
    "libzstd1",
    "liblz4-1",
)
CRUN_PATH = "usr/bin/crun"
# Netfilter's userspace for the agent's NAT of the host's loopback (harpoon.agent.
# loopback): iptables' legacy multi-call binary, run as `iptables-restore`, and the
# extensions its rules load (dlopen()ed from the xtables directory, so named here).
NETFILTER_PACKAGES: tuple[str, ...] = ("iptables", "libxtables12", "libip4tc2", "libip6tc2")
IPTABLES_BINARY = "usr/sbin/xtables-legacy-multi"
IPTABLES_COMMANDS = ("iptables", "iptables-restore", "iptables-save")
XTABLES_EXTENSIONS = ("libxt_standard.so", "libxt_tcp.so", "libxt_udp.so", "libxt_NAT.so")
XTABLES_EXTENSION_LINKS = {"libxt_DNAT.so": "libxt_NAT.so", "libxt_MASQUERADE.so": "libxt_NAT.so"}
# The shared libraries of protobuf's upb extension beyond libc and libm.
UPB_PACKAGES: tuple[str, ...] = ("libstdc++6", "libgcc-s1")

# Loaded by harpoon.agent.boot, in dependency order, before the agent's imports (the
# virtio_pci ones only where there is a PCI bus).
BOOT_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
)
# Shipped for the agent to load when a container needs them (see modules.json). Only
# what something loads: every MB of initramfs costs ~15 ms of every cold boot under TCG
# (the kernel unpacks it before /init runs). harpoon.agent.modules loads them: the erofs
# rootfs's disks' driver, the layers' and the writable image's filesystems, the overlay;
# virtiofs (and fuse under it) at a virtiofs share's mount; the NIC's driver when a
# container gets a network; AF_VSOCK when the VM's host channel is a vsock device.
ON_DEMAND_MODULES: tuple[str, ...] = (
    "virtio_blk",
    "erofs",
    "ext4",
    "overlay",
    "virtiofs",
    "virtio_net",  # and failover, net_failover under it (harpoon.agent.network)
    # NAT of the host's loopback (harpoon.agent.loopback), with nf_nat, nf_conntrack...,
    # and the filter that keeps the guest from gvproxy's API (harpoon.agent.network)
    "iptable_nat",
    "iptable_filter",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_tcpudp",
    # The host channel over AF_VSOCK in a VM without virtio-serial ports (vfkit's:
    # harpoon.agent.vsock), ~0.2 MB: vsock, its virtio transport's common part, the transport.
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
)

BUSYBOX_APPLETS: tuple[str, ...] = (
    "sh", "ash", "mount", "umount", "insmod", "rmmod", "lsmod", "poweroff", "reboot",
    "halt", "cat", "ls", "echo", "sleep", "mkdir", "rm", "cp", "mv", "ln", "ps", "kill",
    "dmesg", "ip", "ifconfig", "route", "udhcpc", "grep", "sed", "head", "tail", "wc",
    "stat", "uname", "env", "find", "df", "free", "top", "mknod", "chmod", "hostname",
    "sync", "true", "false", "test", "[", "vi", "less", "hexdump", "nc", "wget", "nsenter",
)  # fmt: skip

BOOT_MODULES_PATH = boot.BOOT_MODULES_PATH.lstrip("/")
MODULES_MAP_PATH = "etc/harpoon/modules.json"
IMAGE_INFO_PATH = "etc/harpoon/image.json"

# Python from the first instruction (one exec, no shell): harpoon.agent.boot mounts,
# loads the boot modules, runs the selftest when asked, and becomes the agent.
INIT_SCRIPT = f"""#!/usr/bin/python3 -SB
from {BOOT_ENTRY} import start
start()
"""

FLOOR_INIT_SCRIPT = f"""#!/bin/sh
echo {FLOOR_MARKER}
poweroff -f
"""

Report = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def source_root() -> Path:
    """The directory holding the `harpoon` package (src/ in a checkout)."""
    return Path(harpoon.__file__).resolve().parent.parent


def protobuf_version() -> str:
    """The protobuf version harpoon pins (from the installed distribution's metadata)."""
    import importlib.metadata

    for requirement in importlib.metadata.requires("harpoon") or []:
        name, _, version = requirement.partition("==")
        if name.strip() == PROTOBUF_PROJECT and version:
            return version.split(";")[0].strip()
    raise RuntimeError("harpoon's metadata pins no protobuf version (protobuf==X.Y.Z)")


def ensure_protobuf_wheel(cache_dir: Path, arch: str, report: Report) -> tuple[Path, Path]:
    """protobuf's binary wheel for `arch` (downloaded once) and its unpacked directory.

    It holds the same pure-Python sources as the `py3-none-any` wheel plus the upb
    extension (`UPB_EXTENSION`), which builds the agent's message classes in C: ~0.4 s
    less CPU per cold boot under TCG than pure-Python descriptors (measured)."""
    import subprocess
    import sys

    version = protobuf_version()
    wheels = cache_dir / "wheels"
    pattern = f"protobuf-{version}-*-manylinux*_{WHEEL_MACHINE[arch]}.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        report(f"downloading the protobuf {version} wheel for {arch}")
        wheels.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--platform", WHEEL_PLATFORM[arch],
            "--python-version", ".".join(map(str, python_runtime.GUEST_PYTHON_VERSION)),
            "--implementation", "cp",
            "--dest", str(wheels), f"{PROTOBUF_PROJECT}=={version}",
        ]  # fmt: skip
        subprocess.run(command, check=True, timeout=PIP_TIMEOUT_S)
        found = sorted(wheels.glob(pattern))
        if not found:
            raise RuntimeError(f"pip left no {arch} wheel of protobuf {version} in {wheels}")
    wheel = found[0]
    unpacked = wheels / wheel.name.removesuffix(".whl")
    if not (unpacked / UPB_EXTENSION).is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    if not (unpacked / UPB_EXTENSION).is_file():
        raise RuntimeError(f"{wheel.name} has no {UPB_EXTENSION}")
    return wheel, unpacked


def requested_packages(arch: str) -> list[str]:
    """What the lock file is resolved from: the kernel's metapackage, then the packages."""
    return [
        KERNEL_METAPACKAGE[arch],
        *BASE_PACKAGES,
        *UPB_PACKAGES,
        *OCI_RUNTIME_PACKAGES,
        *NETFILTER_PACKAGES,
    ]


def has_apt() -> bool:
    return all(shutil.which(tool) for tool in ("apt-get", "apt-cache"))


def fetch_method(chosen: str | None = None) -> str:
    """How this build fetches packages: `chosen`, else $HARPOON_GUEST_FETCH, else apt
    where there is apt and Python elsewhere."""
    chosen = chosen or os.environ.get(FETCH_ENV) or None
    if chosen is None:
        return "apt" if has_apt() else "python"
    if chosen not in FETCH_METHODS:
        raise debian.DebianError(
            f"{FETCH_ENV} (or --fetch) must be one of {', '.join(FETCH_METHODS)}, not {chosen!r}"
        )
    if chosen == "apt" and not has_apt():
        raise debian.DebianError("fetching with apt, but apt-get or apt-cache is not on PATH")
    return chosen


class _AptResolver:
    """Versions as apt's candidates, with the suite `apt-cache madison` lists each in."""

    def __init__(self, arch: str, cache_dir: Path, report: Report) -> None:
        self.apt = debian.PrivateApt(cache_dir / "apt" / arch, arch)
        report(f"updating the {arch} package lists (apt)")
        self.apt.update()

    def show(self, names: Sequence[str]) -> list[debian.DebPackage]:
        return self.apt.with_suites(self.apt.show(names), DEBIAN_SUITES)


class _PythonResolver:
    """Versions as apt would choose them, from the indices harpoon.guest.mirror fetches."""

    def __init__(self, arch: str, cache_dir: Path, report: Report) -> None:
        self.mirror = mirror.Mirror(arch, cache_dir, report=report)

    def show(self, names: Sequence[str]) -> list[debian.DebPackage]:
        return self.mirror.candidates(names, DEBIAN_SUITES)


def resolve_packages(
    arch: str,
    cache_dir: Path,
    refresh: bool,
    report: Report,
    *,
    lock_file: Path | None = None,
    method: str | None = None,
) -> list[debian.DebPackage]:
    """The exact packages of the image (kernel first), from the repo's lock unless
    `refresh` or the lock is missing. When the package list changed, only the packages
    new to it are resolved: the locked ones (the kernel above all) keep their versions.
    Resolving (apt's or the Python one, as `method`) rewrites the lock."""
    lock_file = lock_file or locks.lock_path(arch)
    locked = locks.read(lock_file)
    requested = requested_packages(arch)
    names = requested[1:]
    kernel_package: debian.DebPackage | None = None
    kept: dict[str, debian.DebPackage] = {}
    if locked is not None and not refresh:
        packages = list(locked.packages)
        if list(locked.requested) == requested:
            return packages
        if packages and locked.requested[:1] == tuple(requested[:1]):
            kernel_package = packages[0]
            kept = {p.name: p for p in packages[1:] if p.name in names}
    resolver_class = _AptResolver if fetch_method(method) == "apt" else _PythonResolver
    resolver = resolver_class(arch, cache_dir, report)
    if kernel_package is None:
        metapackage = resolver.show([KERNEL_METAPACKAGE[arch]])[0]
        kernel_name = debian.exact_dependency(metapackage.depends, KERNEL_PACKAGE_PATTERN[arch])
        kernel_package = resolver.show([kernel_name])[0]
    missing = [n for n in names if n not in kept]
    kept.update(zip(missing, resolver.show(missing) if missing else [], strict=True))
    packages = [kernel_package, *(kept[n] for n in names)]
    locks.write(lock_file, locks.Lock(tuple(requested), DEBIAN_SUITES, tuple(packages)), arch)
    report(f"wrote the {arch} lock {lock_file}")
    return packages


def fetch_debs(
    arch: str,
    packages: Sequence[debian.DebPackage],
    cache_dir: Path,
    method: str,
    report: Report,
) -> list[Path]:
    """The .deb of every package in $HARPOON_CACHE_DIR/debs/<arch>, each checked against
    the lock's SHA256; those missing fetched by apt or by harpoon.guest.mirror."""
    into = cache_dir / "debs" / arch
    if method == "python":
        report(f"fetching {len(packages)} {arch} packages (Python, no apt)")
        return mirror.Mirror(arch, cache_dir, report=report).download(packages, into)
    apt = debian.PrivateApt(cache_dir / "apt" / arch, arch)
    missing = [p for p in packages if not debian.deb_ok(into / p.deb_name, p.sha256)]
    if missing and not apt.has_lists:
        report(f"updating the {arch} package lists (apt)")
        apt.update()
    report(f"fetching {len(packages)} {arch} packages (apt; {len(missing)} not cached)")
    return apt.download(packages, into)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BuildPlan:
    """What one build is made from (resolved, not yet fetched) and its digest."""

    arch: str
    packages: tuple[debian.DebPackage, ...]
    cache_dir: Path
    wheel_dir: Path
    source_dir: Path
    inputs: dict[str, Any]
    digest: str
    fetch: str = "apt"  # how missing .debs are fetched (fetch_method)

    @property
    def kernel_release(self) -> str:
        return self.packages[0].name.removeprefix("linux-image-").removesuffix("-unsigned")


def build_inputs(
    arch: str, packages: Sequence[debian.DebPackage], wheel: Path, source_dir: Path
) -> dict[str, Any]:
    """Everything the image is made from, for its digest (small files only: fast)."""
    sources = python_runtime.harpoon_sources(source_dir)
    return {
        "format": FORMAT_VERSION,
        "arch": arch,
        "packages": [[p.name, p.version, p.sha256] for p in packages],
        "protobuf_wheel": [wheel.name, _sha256(wheel.read_bytes())],
        "harpoon": {name: _sha256(path.read_bytes()) for name, path in sources.items()},
        "boot_modules": list(BOOT_MODULES),
        "on_demand_modules": list(ON_DEMAND_MODULES),
        "extra_python_modules": list(python_runtime.EXTRA_MODULES),
        "excluded_python_modules": list(python_runtime.EXCLUDED_MODULES),
        "base_packages": list(BASE_PACKAGES),
        "oci_runtime_packages": list(OCI_RUNTIME_PACKAGES),
        "upb_packages": list(UPB_PACKAGES),
        "crun": CRUN_PATH,
        "busybox_applets": list(BUSYBOX_APPLETS),
        "init": _sha256(INIT_SCRIPT.encode() + FLOOR_INIT_SCRIPT.encode()),
        "pyc_magic": importlib.util.MAGIC_NUMBER.hex(),
        "compression": INITRD_COMPRESSION,
    }


def _busybox_entries(root: Path) -> list[initramfs.Entry]:
    busybox = python_runtime.resolve_in_root(root, "bin/busybox")
    entries = [
        initramfs.file("bin/busybox", busybox.read_bytes(), 0o755),
        initramfs.char_device("dev/console", 5, 1),
        initramfs.char_device("dev/null", 1, 3, 0o666),
        # Python starts before /dev is mounted: its hash seed comes from here when the
        # kernel's random pool is not ready yet.
        initramfs.char_device("dev/urandom", 1, 9, 0o666),
    ]
    entries += [initramfs.symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS]
    entries += [initramfs.symlink("sbin", "bin"), initramfs.directory("tmp", 0o1777)]
    entries += [initramfs.directory(d) for d in ("proc", "sys", "run", "root", "mnt", "etc")]
    return entries


def _compile_tree(files: dict[str, Path]) -> list[initramfs.Entry]:
    """Guest .py path -> source becomes sourceless .pyc entries."""
    entries = []
    for guest, source in sorted(files.items()):
        pyc = python_runtime.compile_pyc(source.read_bytes(), "/" + guest)
        entries.append(initramfs.file(guest.removesuffix(".py") + ".pyc", pyc))
    return entries


def _python_entries(
    root: Path, plan: BuildPlan, report: Report
) -> tuple[list[initramfs.Entry], list[str], dict[str, Any]]:
    """The interpreter, its stdlib closure, protobuf and harpoon, and the ELF files among
    them (whose shared libraries `_native_entries` adds)."""
    arch, wheel_dir, guest_lib = plan.arch, plan.wheel_dir, python_runtime.GUEST_STDLIB
    report("measuring the agent's Python module closure")
    modules = python_runtime.imported_modules(
        [plan.source_dir, wheel_dir], AGENT_ENTRY, [BOOT_ENTRY, *python_runtime.EXTRA_MODULES]
    )
    harpoon_sources = python_runtime.harpoon_sources(plan.source_dir)
    stray = python_runtime.unshipped_harpoon_modules(modules, harpoon_sources)
    if stray:
        raise python_runtime.PythonRuntimeError(
            f"the agent imports {', '.join(stray)}, which never go into the guest: guest code "
            f"is harpoon/*.py and the packages {', '.join(python_runtime.HARPOON_GUEST_PACKAGES)}"
        )
    stdlib, builtin = python_runtime.stdlib_files(modules, root, arch)
    interpreter = f"usr/bin/{python_runtime.GUEST_PYTHON}"
    extensions = [g for g in stdlib if g.endswith(".so")]
    report(f"compiling {len(stdlib) - len(extensions)} stdlib modules, protobuf and harpoon")
    entries = [
        initramfs.file(interpreter, (root / interpreter).read_bytes(), 0o755),
        initramfs.symlink("usr/bin/python3", python_runtime.GUEST_PYTHON),
        initramfs.directory(python_runtime.GUEST_DYNLOAD),
    ]
    entries += [initramfs.file(g, stdlib[g].read_bytes(), 0o644) for g in extensions]
    entries += _compile_tree({g: p for g, p in stdlib.items() if g.endswith(".py")})
    # All of pure-Python protobuf: its lazy imports (json_format, well_known_types...)
    # would otherwise be missed by the measured closure.
    protobuf = {
        f"{guest_lib}/{p.relative_to(wheel_dir).as_posix()}": p
        for p in sorted((wheel_dir / "google").rglob("*.py"))
    }
    entries += _compile_tree(protobuf)
    upb = f"{guest_lib}/{UPB_EXTENSION}"
    (root / upb).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheel_dir / UPB_EXTENSION, root / upb)  # where library_closure looks
    entries.append(initramfs.file(upb, (root / upb).read_bytes(), 0o755))
    entries += _compile_tree({f"{guest_lib}/harpoon/{n}": p for n, p in harpoon_sources.items()})
    summary = {"stdlib_files": len(stdlib), "assumed_builtin": builtin}
    return entries, [interpreter, *extensions, upb], summary


def _native_entries(
    root: Path, arch: str, binaries: Sequence[str]
) -> tuple[list[initramfs.Entry], list[str]]:
    """The dynamic loader and every shared library `binaries` (guest paths, already
    shipped) need, each once, and the list of them for the manifest."""
    libraries, links = python_runtime.library_closure(root, binaries, arch)
    entries = [initramfs.file(g, p.read_bytes(), 0o755) for g, p in libraries.items()]
    entries += [initramfs.symlink(g, target) for g, target in links.items()]
    return entries, sorted([*libraries, *links])


def _xtables_dir(arch: str) -> str:
    return f"usr/lib/{python_runtime.MULTIARCH_TRIPLET[arch]}/xtables"


def _netfilter_entries(root: Path, arch: str) -> tuple[list[initramfs.Entry], list[str]]:
    """iptables (legacy) and the extensions the agent's rules use; and the ELF files
    among them, whose libraries the image must ship."""
    shipped = [IPTABLES_BINARY, *(f"{_xtables_dir(arch)}/{name}" for name in XTABLES_EXTENSIONS)]
    entries = [
        initramfs.file(guest, python_runtime.resolve_in_root(root, guest).read_bytes(), 0o755)
        for guest in shipped
    ]
    entries += [
        initramfs.symlink(f"usr/sbin/{command}", "xtables-legacy-multi")
        for command in IPTABLES_COMMANDS
    ]
    entries += [
        initramfs.symlink(f"{_xtables_dir(arch)}/{link}", target)
        for link, target in XTABLES_EXTENSION_LINKS.items()
    ]
    return entries, shipped


def _crun_entry(root: Path) -> initramfs.Entry:
    crun = python_runtime.resolve_in_root(root, CRUN_PATH)
    if not crun.is_file():
        raise python_runtime.PythonRuntimeError(
            f"no {CRUN_PATH} in the unpacked packages: is `crun` in OCI_RUNTIME_PACKAGES?"
        )
    return initramfs.file(CRUN_PATH, crun.read_bytes(), 0o755)


def _module_entries(root: Path, release: str) -> tuple[list[initramfs.Entry], dict[str, Any]]:
    modules = kernel.select_modules(
        root / "lib/modules" / release, [*BOOT_MODULES, *ON_DEMAND_MODULES]
    )
    boot = kernel.load_order([m for m in BOOT_MODULES if m in modules.files], modules.depends)
    entries = [
        initramfs.file(
            modules.guest_path(name), kernel.strip_signature(kernel.decompress_module(path), name)
        )
        for name, path in sorted(modules.files.items())
    ]
    dependency_map = {
        name: ["/" + modules.guest_path(m) for m in modules.closure(name)]
        for name in sorted(modules.files)
    }
    entries.append(
        initramfs.file(
            BOOT_MODULES_PATH, "".join(f"/{modules.guest_path(m)}\n" for m in boot).encode()
        )
    )
    entries.append(
        initramfs.file(MODULES_MAP_PATH, (json.dumps(dependency_map, indent=1) + "\n").encode())
    )
    summary = {"boot": boot, "shipped": sorted(modules.files), "builtin": sorted(modules.builtin)}
    return entries, summary


def _kernel_image(root: Path, arch: str, release: str) -> tuple[str, bytes]:
    vmlinuz = (root / "boot" / f"vmlinuz-{release}").read_bytes()
    if arch == "amd64":
        return "vmlinux", kernel.extract_vmlinux(vmlinuz)
    return "Image", kernel.arm64_image(vmlinuz)


def _write_initrd(directory: Path, name: str, entries: Iterable[initramfs.Entry]) -> str:
    archive = initramfs.write(entries)
    if INITRD_COMPRESSION == "gzip":
        name += ".gz"
        archive = gzip.compress(archive, compresslevel=6, mtime=0)
    (directory / name).write_bytes(archive)
    return name


def build_guest(
    arch: str | None = None,
    *,
    cache_dir: Path | None = None,
    guest_dir: Path | None = None,
    refresh: bool = False,
    source_dir: Path | None = None,
    lock_dir: Path | None = None,
    fetch: str | None = None,
    report: Report = _quiet,
) -> GuestImage:
    """Build (or find, when its inputs are unchanged) the guest image for `arch`.

    `source_dir` holds the `harpoon` package to put in the image (default: this one's);
    `lock_dir` the package locks (default: harpoon.guest.lock's); `fetch` is "apt" or
    "python" (default: fetch_method's choice).
    """
    started = time.monotonic()
    arch = cache.check_arch(arch or cache.host_arch())
    python_runtime.check_host_python()
    cache_dir = cache.cache_root(cache_dir)
    method = fetch_method(fetch)
    lock_file = locks.lock_path(arch, lock_dir)
    with cache.build_lock(arch, guest_dir):
        packages = resolve_packages(
            arch, cache_dir, refresh, report, lock_file=lock_file, method=method
        )
        wheel, wheel_dir = ensure_protobuf_wheel(cache_dir, arch, report)
        source_dir = source_dir or source_root()
        inputs = build_inputs(arch, packages, wheel, source_dir)
        digest = cache.digest_of(inputs)
        plan = BuildPlan(
            arch, tuple(packages), cache_dir, wheel_dir, source_dir, inputs, digest, method
        )
        final = cache.image_dir(arch, digest, guest_dir)
        if (final / cache.MANIFEST_NAME).exists():
            cache.set_current(arch, final, guest_dir)
            report(f"{arch} guest {digest[:12]} is up to date ({time.monotonic() - started:.2f} s)")
            return cache.image_from_manifest(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as scratch:
            work = Path(scratch)
            _build_into(work / "image", work / "root", plan, report)
            shutil.rmtree(final, ignore_errors=True)
            (work / "image").rename(final)
        cache.set_current(arch, final, guest_dir)
        cache.prune(arch, guest_dir)
        report(f"built {arch} guest {digest[:12]} in {time.monotonic() - started:.1f} s")
        return cache.image_from_manifest(final)


def _build_into(out: Path, root: Path, plan: BuildPlan, report: Report) -> None:
    arch = plan.arch
    debs = fetch_debs(arch, plan.packages, plan.cache_dir, plan.fetch, report)
    for deb in debs:
        report(f"unpacking {deb.name}")
        debian.extract(deb, root)
    release = plan.kernel_release
    out.mkdir()
    report("extracting the kernel")
    config_file = root / "boot" / f"config-{release}"
    problems = kernel.config_problems(config_file.read_text(), arch)
    if problems:
        raise RuntimeError(
            f"the {arch} kernel {release} cannot run harpoon's guest: " + "; ".join(problems)
        )
    kernel_name, kernel_bytes = _kernel_image(root, arch, release)
    (out / kernel_name).write_bytes(kernel_bytes)

    base = _busybox_entries(root)
    base.append(initramfs.file("init", FLOOR_INIT_SCRIPT.encode(), 0o755))
    floor_name = _write_initrd(out, "floor.cpio", base)

    report("selecting kernel modules")
    module_entries, module_summary = _module_entries(root, release)
    python_entries, python_binaries, python_summary = _python_entries(root, plan, report)
    netfilter_entries, netfilter_binaries = _netfilter_entries(root, arch)
    report("resolving shared libraries (python, upb, crun, iptables)")
    native_entries, libraries = _native_entries(
        root, arch, [*python_binaries, CRUN_PATH, *netfilter_binaries]
    )
    info = {"arch": arch, "digest": plan.digest, "kernel_release": release}
    entries = [
        *base,
        initramfs.file("init", INIT_SCRIPT.encode(), 0o755),
        *module_entries,
        *python_entries,
        _crun_entry(root),
        *netfilter_entries,
        *native_entries,
        initramfs.file(IMAGE_INFO_PATH, (json.dumps(info) + "\n").encode()),
    ]
    report("writing the initramfs")
    initrd_name = _write_initrd(out, "initrd.cpio", entries)
    manifest = {
        **info,
        "kernel": kernel_name,
        "initrd": initrd_name,
        "floor": floor_name,
        "sizes_bytes": {
            n: (out / n).stat().st_size for n in (kernel_name, initrd_name, floor_name)
        },
        "modules": module_summary,
        "python": python_summary,
        "libraries": libraries,
        "inputs": plan.inputs,
    }
    (out / cache.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


def build_floor_image(
    arch: str | None = None,
    *,
    cache_dir: Path | None = None,
    guest_dir: Path | None = None,
    report: Report = _quiet,
) -> GuestImage:
    """The boot-floor baseline: the guest's kernel with a busybox-only initramfs that
    prints `FLOOR_MARKER` and powers off. Built together with the guest image."""
    image = build_guest(arch, cache_dir=cache_dir, guest_dir=guest_dir, report=report)
    return cache.image_from_manifest(image.kernel.parent, "floor")
