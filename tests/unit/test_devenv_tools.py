"""The source builds of harpoon.devenv.tools (shimtest, nerdctl, gvproxy, buildkit): pins,
cache names and the build's steps, with a fake tool built from a tarball made here (no Go
involved)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from harpoon.devenv import tools
from harpoon.devenv.tools import (
    BUILDKIT,
    GVPROXY,
    NERDCTL,
    SHIMTEST,
    SOURCE_BUILDS,
    SourceBuild,
    SourceTarball,
    build_source,
    install_source_build,
)
from harpoon.net import gvproxy


@dataclass(frozen=True)
class FakeTool(SourceBuild):
    """Its "build" writes an executable script from the unpacked tree's one file."""

    def outputs(self) -> dict[str, str]:
        return {"fake": "out/fake"}

    def commands(self, go: Path) -> list[list[str]]:
        script = "mkdir out && cp src.sh out/fake && chmod +x out/fake && test $FAKE_FLAG = on"
        return [["sh", "-c", script]]

    def environment(self) -> dict[str, str]:
        return {"FAKE_FLAG": "on"}


def fake_tarball(third_party: Path, content: bytes = b"#!/bin/sh\necho fake\n") -> SourceTarball:
    third_party.mkdir(exist_ok=True)
    path = third_party / "fake-v1.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("fake-v1/src.sh")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return SourceTarball(path.name, hashlib.sha256(path.read_bytes()).hexdigest(), "fake-v1")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TOOLS_CACHE_DIR in tmp_path, and a `go` that is never run (the fake needs none)."""
    monkeypatch.setattr(tools, "TOOLS_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(tools, "go_binary", lambda: Path("/nonexistent/go"))
    return tmp_path / "cache"


def test_another_recipe_is_another_cache_directory() -> None:
    # A cached build of the old recipe must not pass for the new one.
    class Rebuilt(type(SHIMTEST)):  # type: ignore[misc]
        def commands(self, go: Path) -> list[list[str]]:
            return [*super().commands(go), ["true"]]

    rebuilt = Rebuilt(name=SHIMTEST.name, source=SHIMTEST.source, beside=SHIMTEST.beside)
    assert rebuilt.cache_dir != SHIMTEST.cache_dir
    assert rebuilt.cache_dir.name.startswith("shimtest-")


def test_shimtest_testbin_is_built_without_preemption_signals() -> None:
    # The container init `forever` exits on any signal, the Go runtime's SIGURG too.
    last = SHIMTEST.commands(Path("/usr/local/go/bin/go"))[-1]
    assert last[last.index("-o") + 1] == SHIMTEST.outputs()[SHIMTEST.testbin.name]
    assert "-X=runtime.godebugDefault=asyncpreemptoff=1" in last[last.index("-ldflags") + 1]


def test_each_pin_has_its_own_cache_directory() -> None:
    other = SourceTarball(NERDCTL.source.file_name, "0" * 64, NERDCTL.source.directory_name)
    moved = type(NERDCTL)(name=NERDCTL.name, source=other, version=NERDCTL.version)
    assert moved.cache_dir != NERDCTL.cache_dir
    assert NERDCTL.cache_dir.name.startswith("nerdctl-")
    assert set(SOURCE_BUILDS) == {"shimtest", "nerdctl", "gvproxy", "buildkit"}


def test_nerdctl_is_built_static_with_its_version_stamped() -> None:
    (command,) = NERDCTL.commands(Path("/usr/local/go/bin/go"))
    assert command[:2] == ["/usr/local/go/bin/go", "build"]
    assert "-X github.com/containerd/nerdctl/v2/pkg/version.Version=v2.3.5" in command
    assert command[-1] == "./cmd/nerdctl"
    assert NERDCTL.environment() == {"CGO_ENABLED": "0"}


def test_gvproxy_is_built_static_from_its_vendored_modules() -> None:
    (command,) = GVPROXY.commands(Path("/usr/local/go/bin/go"))
    assert command[:3] == ["/usr/local/go/bin/go", "build", "-mod=vendor"]
    assert command[-1] == "./cmd/gvproxy"
    assert GVPROXY.outputs() == {"gvproxy": command[command.index("-o") + 1]}
    assert GVPROXY.environment() == {"CGO_ENABLED": "0"}
    # The version harpoon.net.gvproxy names is the one built.
    assert GVPROXY.source.file_name == f"gvisor-tap-vsock-v{gvproxy.VERSION}.tar.gz"
    assert GVPROXY.binary == GVPROXY.cache_dir / "gvproxy"


def test_buildkit_is_buildkitd_and_buildctl_static_from_vendored_modules_version_stamped() -> None:
    (command,) = BUILDKIT.commands(Path("/usr/local/go/bin/go"))
    assert command[:3] == ["/usr/local/go/bin/go", "build", "-mod=vendor"]
    assert command[-2:] == ["./cmd/buildkitd", "./cmd/buildctl"]
    stamp = command[command.index("-ldflags") + 1]
    assert "-X github.com/moby/buildkit/version.Version=v0.32.2" in stamp
    assert f"-X github.com/moby/buildkit/version.Revision={BUILDKIT.revision}" in stamp
    # Both binaries land where outputs() copies them from.
    out_dir = command[command.index("-o") + 1]
    assert BUILDKIT.outputs() == {name: f"{out_dir}{name}" for name in ("buildkitd", "buildctl")}
    assert BUILDKIT.environment() == {"CGO_ENABLED": "0"}
    assert BUILDKIT.source.file_name == f"buildkit-v{BUILDKIT.version}.tar.gz"
    assert (BUILDKIT.buildkitd, BUILDKIT.buildctl) == (
        BUILDKIT.cache_dir / "buildkitd",
        BUILDKIT.cache_dir / "buildctl",
    )
    assert BUILDKIT.cache_dir.name.startswith("buildkit-")


def test_a_build_leaves_its_outputs_in_the_cache_directory(cache: Path, tmp_path: Path) -> None:
    tool = FakeTool(name="fake", source=fake_tarball(tmp_path / "third_party"))
    assert tool.missing_binaries() == [tool.cache_dir / "fake"]
    build_source(tool, tmp_path / "third_party")
    assert tool.missing_binaries() == []
    assert tool.cache_dir.parent == cache
    assert subprocess.run([tool.cache_dir / "fake"], capture_output=True).stdout == b"fake\n"
    assert [p.name for p in cache.iterdir()] == [tool.cache_dir.name]  # no staging left
    assert install_source_build(tool, tmp_path / "third_party") == 0  # present: no build


def test_a_tarball_that_is_not_the_pinned_one_is_refused(cache: Path, tmp_path: Path) -> None:
    pinned = fake_tarball(tmp_path / "third_party")
    fake_tarball(tmp_path / "third_party", b"#!/bin/sh\necho changed\n")
    tool = FakeTool(name="fake", source=pinned)
    with pytest.raises(ValueError, match="not the pinned"):
        build_source(tool, tmp_path / "third_party")
    assert install_source_build(tool, tmp_path / "third_party") == 1
    assert not cache.exists() or not any(cache.iterdir())


def test_a_failed_step_leaves_no_cache_directory(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = FakeTool(name="fake", source=fake_tarball(tmp_path / "third_party"))
    monkeypatch.setattr(FakeTool, "environment", lambda self: {"FAKE_FLAG": "off"})
    assert install_source_build(tool, tmp_path / "third_party") == 1
    assert tool.missing_binaries() == [tool.cache_dir / "fake"]
    assert list(cache.iterdir()) == []


def test_the_debian_mirror_is_the_one_of_the_machines_release(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64] https://packages.example.com/apt cloud-sdk-bookworm main\n"
    )
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    (parts / "other.list").write_text("deb https://deb.nodesource.com/node_20.x nodistro main\n")
    sources = (tmp_path / "sources.list", parts)
    assert tools.debian_mirror(sources, "bookworm") == "http://mirror.example/debian"
    assert tools.debian_mirror(sources, "trixie") == tools.DEFAULT_DEBIAN_MIRROR


def test_erofs_utils_is_pinned_by_version_and_dsc_hash() -> None:
    erofs = tools.EROFS_UTILS
    assert erofs.suite == "trixie" and erofs.version.startswith("1.8.")
    assert erofs.cache_dir.name == f"erofs-utils-{erofs.version}-{erofs.dsc_sha256[:16]}"
    assert "mkfs.erofs" in dict(erofs.outputs)
    assert ("./configure", "--disable-fuse") in erofs.commands
