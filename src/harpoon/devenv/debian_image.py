"""Builds an OCI image of Debian packages, nginx and python3 by default, for the tests.

The image has two layers: the busybox image's (harpoon.devenv.images: `sh` and the
usual tools, and the layer a registry or content store already holds), then every
package that `apt-get install --no-install-recommends nginx python3` would install into
an empty system, unpacked as dpkg unpacks them. Maintainer scripts are not run (they
would need the packages' own interpreters running on the build host): what they, or
base-passwd and Docker's official nginx image, would have left behind is written by
`_what_scripts_leave` and `_compiled` instead: the users nginx runs as, its default
site enabled, its document root, and its logs sent to the container's stdout and stderr
(so `logs` shows requests, as with the `nginx` image users know); Python's bytecode.

Packages come from the archive the host's apt sources name, through the guest build's
private apt state (harpoon.guest.debian: nothing is installed on the host). The image
is a function of the exact packages (name, version, SHA256), the busybox layer, the
reference and the architecture; it is cached under that key, so a second build only
asks apt which versions are current.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import posixpath
import struct
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from harpoon.devenv.images import (
    IMAGE_PATH,
    ImageBuildError,
    build_layout,
    host_busybox_layer,
    tar_bytes,
    tar_info,
    write_layout_tar,
)
from harpoon.guest import cache, debian
from harpoon.guest.cache import host_arch

#: Bump when the layer's assembly changes, so cached tarballs are rebuilt.
DEBIAN_IMAGE_REVISION = 3

#: The reference the tests use (fully qualified, as BUSYBOX_REF is).
DEBIAN_WEB_REF = "docker.io/harpoon/debian-web:bookworm"
WEB_PACKAGES = ("nginx", "python3")

#: The users and groups base-passwd would give, for those the packages run as.
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n"
#: libc-bin's postinst installs its nsswitch.conf. Without one, glibc asks DNS for a
#: host *before* /etc/hosts, where nerdctl writes the names of a container's network.
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"

#: What a container of the image runs by default: nginx in the foreground, as the
#: official `nginx` image does (SIGQUIT is nginx's graceful stop).
WEB_RUN_CONFIG = {
    "Env": [f"PATH={IMAGE_PATH}"],
    "Cmd": ["nginx", "-g", "daemon off;"],
    "ExposedPorts": {"80/tcp": {}},
    "StopSignal": "SIGQUIT",
}

Report = Callable[[str], None]
Entry = tuple[tarfile.TarInfo, bytes | None]


def _normalised(name: str) -> str:
    """A data.tar member's name as a layer names it (`./usr/bin/x` → `usr/bin/x`)."""
    return str(PurePosixPath("/", name)).lstrip("/")


def _package_entries(archive: tarfile.TarFile) -> Iterator[Entry]:
    for member in archive:
        name = _normalised(member.name)
        if not name:
            continue  # the archive's root, "./"
        info = tar_info(name, member.type, member.mode, member.size, member.linkname)
        info.mtime, info.uid, info.gid = member.mtime, member.uid, member.gid
        if member.islnk():
            info.linkname = _normalised(member.linkname)
        data = None
        if member.isreg():
            stream = archive.extractfile(member)
            assert stream is not None
            data = stream.read()
        yield info, data


def _what_scripts_leave(packaged: dict[str, Entry]) -> list[Entry]:
    """The files the maintainer scripts (and base-passwd, and the official nginx image)
    would leave, given what the packages put in the layer."""
    entries: list[Entry] = []
    names = set(packaged)

    def directory(name: str) -> None:
        if name not in names:
            entries.append((tar_info(name, tarfile.DIRTYPE, 0o755), None))
            names.add(name)

    def regular(name: str, data: bytes) -> None:
        entries.append((tar_info(name, tarfile.REGTYPE, 0o644, len(data)), data))

    def symlink(name: str, target: str) -> None:
        entries.append((tar_info(name, tarfile.SYMTYPE, 0o777, link=target), None))

    directory("etc")
    regular("etc/passwd", PASSWD.encode())
    regular("etc/group", GROUP.encode())
    regular("etc/nsswitch.conf", NSSWITCH.encode())
    directory("run")  # nginx.conf's pid file
    if "usr/sbin/nginx" in names:
        if "etc/nginx/sites-available/default" in names:
            # nginx-common's postinst enables the default site on a first install.
            directory("etc/nginx/sites-enabled")
            symlink("etc/nginx/sites-enabled/default", "/etc/nginx/sites-available/default")
        for name in ("var", "var/www", "var/www/html", "var/lib", "var/lib/nginx", "var/log"):
            directory(name)
        _, welcome = packaged.get("usr/share/nginx/html/index.html", (None, None))
        if welcome is not None:
            regular("var/www/html/index.nginx-debian.html", welcome)
        directory("var/log/nginx")
        symlink("var/log/nginx/access.log", "/dev/stdout")
        symlink("var/log/nginx/error.log", "/dev/stderr")
    return entries


def _pyc(source: bytes, name: str, mtime: int) -> bytes | None:
    """A timestamp-checked .pyc of `source` (at /`name`), as py_compile writes it; None
    if it does not compile (py3compile skips those too)."""
    try:
        code = compile(source, "/" + name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    header = importlib.util.MAGIC_NUMBER + struct.pack(
        "<III", 0, mtime & 0xFFFFFFFF, len(source) & 0xFFFFFFFF
    )
    return header + marshal.dumps(code)


def _compiled(entries: dict[str, Entry]) -> list[Entry]:
    """What python3's postinst (py3compile) leaves: the bytecode of every module of
    the image's Python, so that a container does not compile the stdlib again at each
    start (seconds under TCG). Only when this interpreter's bytecode is the image's
    (the same minor version: the same magic number); else none, and the image's Python
    compiles as it imports."""
    prefix = f"usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/"
    tag = sys.implementation.cache_tag
    made: list[Entry] = []
    caches: set[str] = set()
    for name, (info, data) in entries.items():
        if not (name.startswith(prefix) and name.endswith(".py") and info.isreg() and data):
            continue
        pyc = _pyc(data, name, int(info.mtime))
        if pyc is None:
            continue
        directory, module = posixpath.split(name)
        cache = f"{directory}/__pycache__"
        if cache not in caches and cache not in entries:
            cache_info = tar_info(cache, tarfile.DIRTYPE, 0o755)
            cache_info.mtime = info.mtime
            made.append((cache_info, None))
            caches.add(cache)
        target = f"{cache}/{module[:-3]}.{tag}.pyc"
        pyc_info = tar_info(target, tarfile.REGTYPE, 0o644, len(pyc))
        pyc_info.mtime = info.mtime
        made.append((pyc_info, pyc))
    return made


def debian_layer(debs: Sequence[Path]) -> bytes:
    """One uncompressed layer of every file of `debs` (in order: a later package's file
    replaces an earlier one's, as dpkg's Replaces would; a directory keeps its first
    entry), then what their maintainer scripts would leave."""
    entries: dict[str, Entry] = {}
    for deb in debs:
        with debian.data_tar(deb) as archive:
            for info, data in _package_entries(archive):
                if info.isdir() and info.name in entries:
                    continue
                entries.pop(info.name, None)  # re-added last: after its directory
                entries[info.name] = (info, data)
    extra = _compiled(entries) + _what_scripts_leave(entries)
    for info, data in extra:
        entries.pop(info.name, None)
        entries[info.name] = (info, data)
    # GNU tar headers: Python's stdlib has names and link targets longer than USTAR's.
    return tar_bytes(list(entries.values()), tarfile.GNU_FORMAT)


def build_debian_image(
    out_dir: Path,
    ref: str = DEBIAN_WEB_REF,
    packages: Sequence[str] = WEB_PACKAGES,
    run_config: dict[str, Any] | None = None,
    *,
    cache_dir: Path | None = None,
    report: Report = lambda _message: None,
) -> Path:
    """An OCI image-layout tarball of `packages` over the busybox layer, named `ref`,
    running `run_config` (nginx's, WEB_RUN_CONFIG, by default), in `out_dir`; cached.
    Needs apt and the archive (the first time, or when the archive moved on)."""
    run_config = run_config or WEB_RUN_CONFIG
    arch = host_arch()
    root = cache.cache_root(cache_dir)
    apt = debian.PrivateApt(root / "apt" / arch, arch)
    base, base_arch = host_busybox_layer()
    if base_arch != arch:
        raise ImageBuildError(f"the host's busybox is {base_arch}, not {arch}")
    for attempt in ("with the lists apt has", "after fetching the lists again"):
        try:
            if attempt != "with the lists apt has" or not apt.has_lists:
                apt.update()
            resolved = apt.closure(packages)
            key = hashlib.sha256(
                json.dumps([
                    DEBIAN_IMAGE_REVISION, ref, arch, hashlib.sha256(base).hexdigest(),
                    sys.implementation.cache_tag,
                    [[p.name, p.version, p.sha256] for p in resolved], run_config,
                ]).encode()
            ).hexdigest()[:16]  # fmt: skip
            out = out_dir / f"debian-{arch}-{key}.oci.tar"
            if out.exists():
                return out
            report(f"downloading {len(resolved)} Debian packages for {ref}")
            debs = apt.download(resolved, root / "debs" / arch)
            break
        except debian.DebianError as error:
            # Stale lists name versions that left the pool; fetched again, they don't.
            failure = error
    else:
        raise ImageBuildError(f"cannot build {ref} from {', '.join(packages)}: {failure}")
    report(f"assembling {ref}")
    layout = build_layout(base, ref, arch, [debian_layer(debs)], run_config)
    write_layout_tar(layout, out)
    return out
