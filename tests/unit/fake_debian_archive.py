"""A small Debian archive made in a temporary directory: real .deb files (ar, control and
data tars), Packages indices, a Release listing them, InRelease clearsigned with a key
made for the test (gpg, in a private home), served over loopback HTTP.

It has the layout and formats of Debian's archive, so harpoon.guest.mirror reads it as it
reads a real mirror; tests then damage one file at a time and expect the refusal."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import lzma
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harpoon.guest.debian import DebPackage

GPG_TIMEOUT_S = 60


def tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += header.encode() + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def make_deb(
    name: str, version: str, arch: str, files: dict[str, bytes], data_member: str = "data.tar.xz"
) -> bytes:
    """A .deb as dpkg-deb builds one: debian-binary, control.tar.xz, data.tar.*."""
    control = f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n".encode()
    data = tar_xz(files) if data_member.endswith(".xz") else files.get("", b"")
    return ar([
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"control": control})),
        (data_member, data),
    ])  # fmt: skip


@dataclass
class Gpg:
    """A signing key in a private gpg home: its public keyring for gpgv, and clearsign."""

    home: Path
    keyring: Path

    def clearsign(self, text: str) -> bytes:
        done = subprocess.run(
            ["gpg", "--homedir", str(self.home), "--batch", "--yes", "--pinentry-mode",
             "loopback", "--passphrase", "", "--digest-algo", "SHA256", "--clearsign"],
            input=text.encode(), capture_output=True, timeout=GPG_TIMEOUT_S, check=True,
        )  # fmt: skip
        return done.stdout


@contextlib.contextmanager
def gpg_key(uid: str) -> Iterator[Gpg]:
    """A new ed25519 signing key; the gpg-agent its home started is stopped after."""
    # Short: gpg-agent's socket lives in the home (unix socket paths are short).
    home = Path(tempfile.mkdtemp(prefix="hp-gpg-"))
    home.chmod(0o700)
    try:
        subprocess.run(
            ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
             "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
            capture_output=True, timeout=GPG_TIMEOUT_S, check=True,
        )  # fmt: skip
        keyring = home / "public.gpg"
        exported = subprocess.run(
            ["gpg", "--homedir", str(home), "--batch", "--export", uid],
            capture_output=True, timeout=GPG_TIMEOUT_S, check=True,
        )  # fmt: skip
        keyring.write_bytes(exported.stdout)
        yield Gpg(home, keyring)
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            capture_output=True, timeout=GPG_TIMEOUT_S, check=False,
        )  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)


def fake_signature(text: str) -> bytes:
    """A clearsigned message's shape with no valid signature (for a machine without gpg:
    only the parsing is exercised then)."""
    escaped = "".join(
        f"- {line}" if line.startswith("-") else line for line in text.splitlines(True)
    )
    return (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n" + escaped
        + "-----BEGIN PGP SIGNATURE-----\n\nbm90IGEgc2lnbmF0dXJl\n-----END PGP SIGNATURE-----\n"
    ).encode()  # fmt: skip


@dataclass
class Suite:
    """What one suite publishes: (package, .deb bytes) for one architecture."""

    name: str
    arch: str
    debs: list[tuple[DebPackage, bytes]] = field(default_factory=list)
    valid_until: str | None = None

    def add(self, name: str, version: str, files: dict[str, bytes], **deb: str) -> DebPackage:
        data = make_deb(name, version, self.arch, files, **deb)
        pool = f"pool/main/{name[0]}/{name}/{name}_{version.split(':')[-1]}_{self.arch}.deb"
        package = DebPackage(
            name, version, self.arch, pool, hashlib.sha256(data).hexdigest(),
            size=len(data), suite=self.name,
        )  # fmt: skip
        self.debs.append((package, data))
        return package


def packages_text(suite: Suite) -> str:
    stanzas = []
    for package, data in suite.debs:
        stanzas.append(
            f"Package: {package.name}\nVersion: {package.version}\n"
            f"Architecture: {package.arch}\n"
            + (f"Depends: {package.depends}\n" if package.depends else "")
            + f"Filename: {package.filename}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
            "Description: a package of the fake archive\n multi-line, as Debian's are\n"
        )
    return "\n".join(stanzas)


def publish(root: Path, suite: Suite, gpg: Gpg | None) -> None:
    """Write the suite's pool files, Packages (plain and xz, also by-hash), Release and
    InRelease (signed by `gpg`, or fake-signed without one) under `root`."""
    for package, data in suite.debs:
        (root / package.filename).parent.mkdir(parents=True, exist_ok=True)
        (root / package.filename).write_bytes(data)
    dists = root / "dists" / suite.name
    binary = dists / "main" / f"binary-{suite.arch}"
    (binary / "by-hash" / "SHA256").mkdir(parents=True, exist_ok=True)
    plain = packages_text(suite).encode()
    indices = {"Packages": plain, "Packages.xz": lzma.compress(plain)}
    lines = []
    for name, data in indices.items():
        digest = hashlib.sha256(data).hexdigest()
        (binary / name).write_bytes(data)
        (binary / "by-hash" / "SHA256" / digest).write_bytes(data)
        lines.append(f" {digest} {len(data):>8} main/binary-{suite.arch}/{name}")
    release = (
        f"Origin: Fake\nSuite: {suite.name}\nCodename: {suite.name}\n"
        "Date: Sat, 05 Dec 2026 03:33:28 UTC\n"
        + (f"Valid-Until: {suite.valid_until}\n" if suite.valid_until else "")
        + f"Acquire-By-Hash: yes\nArchitectures: {suite.arch}\nComponents: main\n"
        "SHA256:\n" + "\n".join(lines) + "\n"
    )
    (dists / "Release").write_text(release)
    (dists / "InRelease").write_bytes(gpg.clearsign(release) if gpg else fake_signature(release))


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory and records each path asked for."""

    def __init__(self, *args: Any, requests: list[str], **kwargs: Any) -> None:
        self.requests = requests  # before the base's __init__, which handles the request
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: object) -> None:
        self.requests.append(self.path)


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, list[str]]]:
    """`root` over HTTP on loopback: its base URL and the paths requested, in order."""
    requests: list[str] = []
    handler = functools.partial(_Handler, requests=requests, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
