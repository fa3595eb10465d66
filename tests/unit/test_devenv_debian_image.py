"""The Debian image's layer (harpoon.devenv.debian_image), from .debs made here: what
the packages ship, in dpkg's order, and what their maintainer scripts would leave.
The real image (nginx and python3 from Debian's archive) runs in tests/e2e."""

from __future__ import annotations

import importlib.util
import io
import lzma
import marshal
import struct
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest

from harpoon.devenv.debian_image import debian_layer
from harpoon.guest import debian

LONG = "usr/lib/python3/dist-packages/" + "a-module-with-a-long-name/" * 5 + "init.py"


def ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}`\n"
        out += header.encode() + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def deb(
    path: Path,
    files: dict[str, bytes | str | None],
    links: Mapping[str, str] = MappingProxyType({}),
) -> Path:
    """A .deb whose data.tar.xz holds `files` (bytes: a file; str: a symlink to it;
    None: a directory) and hard `links` (name: target), named as dpkg-deb names them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        for name, content in files.items():
            info = tarfile.TarInfo(f"./{name}")
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o755
                tar.addfile(info, io.BytesIO(content))
        for name, target in links.items():
            info = tarfile.TarInfo(f"./{name}")
            info.type, info.linkname = tarfile.LNKTYPE, f"./{target}"
            tar.addfile(info)
    path.write_bytes(ar({"debian-binary": b"2.0\n", "data.tar.xz": lzma.compress(buf.getvalue())}))
    return path


def layer_members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return {member.name: member for member in tar}


def read(layer: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        stream = tar.extractfile(name)
        assert stream is not None
        return stream.read()


def test_the_layer_holds_each_package_file_named_as_in_an_image(tmp_path: Path) -> None:
    libc = deb(tmp_path / "libc.deb", {"usr": None, "usr/lib": None, "usr/lib/libc.so": b"c"})
    tool = deb(tmp_path / "tool.deb", {
        "usr": None, "usr/bin": None, "usr/bin/tool": b"#!tool", "usr/bin/alias": "tool",
        "usr/lib": None, "usr/lib/python3": None, "usr/lib/python3/dist-packages": None,
        LONG: b"pass\n",
    }, links={"usr/bin/tool2": "usr/bin/tool"})  # fmt: skip
    layer = debian_layer([libc, tool])
    members = layer_members(layer)
    names = list(members)
    assert not any(name.startswith(("./", "/")) for name in names)
    assert names.index("usr") < names.index("usr/lib") < names.index("usr/lib/libc.so")
    assert names.count("usr") == 1, "a directory two packages ship is in the layer once"
    assert read(layer, "usr/bin/tool") == b"#!tool"
    assert read(layer, LONG) == b"pass\n"
    assert members["usr/bin/alias"].issym() and members["usr/bin/alias"].linkname == "tool"
    assert members["usr/bin/tool2"].islnk() and members["usr/bin/tool2"].linkname == "usr/bin/tool"


def test_a_later_package_replaces_an_earlier_ones_file(tmp_path: Path) -> None:
    first = deb(tmp_path / "a.deb", {"etc": None, "etc/conf": b"first"})
    second = deb(tmp_path / "b.deb", {"etc": None, "etc/conf": b"second"})
    layer = debian_layer([first, second])
    assert read(layer, "etc/conf") == b"second"
    assert list(layer_members(layer)).count("etc/conf") == 1


def test_nginx_gets_what_its_maintainer_scripts_and_the_official_image_leave(
    tmp_path: Path,
) -> None:
    nginx = deb(tmp_path / "nginx.deb", {
        "usr": None, "usr/sbin": None, "usr/sbin/nginx": b"\x7fELF",
        "usr/share": None, "usr/share/nginx": None, "usr/share/nginx/html": None,
        "usr/share/nginx/html/index.html": b"<h1>Welcome</h1>",
        "etc": None, "etc/nginx": None, "etc/nginx/sites-available": None,
        "etc/nginx/sites-available/default": b"server { root /var/www/html; }",
        "var": None, "var/log": None, "var/log/nginx": None,
    })  # fmt: skip
    layer = debian_layer([nginx])
    members = layer_members(layer)
    enabled = members["etc/nginx/sites-enabled/default"]
    assert enabled.issym() and enabled.linkname == "/etc/nginx/sites-available/default"
    assert read(layer, "var/www/html/index.nginx-debian.html") == b"<h1>Welcome</h1>"
    assert members["var/log/nginx/access.log"].linkname == "/dev/stdout"
    assert members["var/log/nginx/error.log"].linkname == "/dev/stderr"
    assert b"www-data:x:33:33:" in read(layer, "etc/passwd")
    assert b"www-data:x:33:" in read(layer, "etc/group")
    assert members["run"].isdir() and members["var/lib/nginx"].isdir()
    assert list(members).count("var/log/nginx") == 1


def test_without_nginx_only_the_user_database_is_added(tmp_path: Path) -> None:
    layer = debian_layer([deb(tmp_path / "py.deb", {"usr": None, "usr/bin": None})])
    assert set(layer_members(layer)) == {
        "usr", "usr/bin", "etc", "etc/passwd", "etc/group", "etc/nsswitch.conf", "run"
    }  # fmt: skip
    assert b"hosts: files dns\n" in read(layer, "etc/nsswitch.conf"), "/etc/hosts first"


def test_a_deb_without_files_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.deb"
    path.write_bytes(ar({"debian-binary": b"2.0\n"}))
    with pytest.raises(debian.DebianError, match=r"no data\.tar member"):
        debian_layer([path])


def test_the_images_python_modules_come_with_their_bytecode(tmp_path: Path) -> None:
    stdlib = f"usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    python = deb(tmp_path / "py.deb", {
        "usr": None, "usr/lib": None, stdlib: None,
        f"{stdlib}/good.py": b"ANSWER = 42\n", f"{stdlib}/bad.py": b"def (:\n",
        "usr/share": None, "usr/share/other.py": b"x = 1\n",
    })  # fmt: skip
    layer = debian_layer([python])
    members = layer_members(layer)
    tag = sys.implementation.cache_tag
    pyc = read(layer, f"{stdlib}/__pycache__/good.{tag}.pyc")
    source = members[f"{stdlib}/good.py"]
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert struct.unpack("<III", pyc[4:16]) == (0, source.mtime, len(b"ANSWER = 42\n"))
    namespace: dict[str, object] = {}
    exec(marshal.loads(pyc[16:]), namespace)
    assert namespace["ANSWER"] == 42
    assert f"{stdlib}/__pycache__/bad.{tag}.pyc" not in members, "no bytecode of bad syntax"
    assert not any(name.startswith("usr/share/__pycache__") for name in members)
