"""`harpoon doctor` on macOS (harpoon.system.doctor_macos), driven on Linux through a
stand-in Mac: what is installed, what containerd prints, its config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harpoon.system import doctor
from harpoon.system.doctor_macos import MacChecks, MacHost
from harpoon.vmm.backend import HostVMM

BREW = "/opt/homebrew/bin"
KEG = "/opt/homebrew/opt/e2fsprogs/sbin"
CONFIG = Path("/etc/containerd/config.toml")
QEMU = HostVMM("qemu-system-aarch64", f"{BREW}/qemu-system-aarch64", "hvf", "brew install qemu")
MKFS_ERofs_HELP = "usage: [options] FILE SOURCE(s)\n --tar=X   generate a full or index-only image"
DIFFER_22 = "[plugins.'io.containerd.differ.v1.erofs']\n  mkfs_options = ['-b4096']\n"


class FakeMac(MacHost):
    """A Mac with these programs (path: what `--version`/`--help` prints) and files."""

    def __init__(self, containerd_version: str = "v2.3.0", config: str | None = None) -> None:
        super().__init__({"PATH": f"{BREW}:/usr/bin:/bin"})
        self.programs = {
            "/usr/local/bin/containerd": (
                f"containerd github.com/containerd/containerd/v2 {containerd_version} 0e1b2c3"
            ),
            f"{BREW}/mkfs.erofs": MKFS_ERofs_HELP,
            f"{BREW}/mkfs.ext4": "mke2fs 1.47.2",
        }
        self.files: dict[Path, str] = {} if config is None else {CONFIG: config}
        self.vmm_found = QEMU
        self.gvproxy_found: str | None = "/opt/homebrew/opt/podman/libexec/podman/gvproxy"
        self.environ = dict(self.environ)
        self.environ["PATH"] += ":/usr/local/bin"

    def which(self, program: str, path: str | None = None) -> str | None:
        for directory in (path if path is not None else self.environ["PATH"]).split(":"):
            if f"{directory}/{program}" in self.programs:
                return f"{directory}/{program}"
        return None

    def output(self, argv: list[str]) -> str | None:
        return self.programs.get(argv[0])

    def read_text(self, path: Path) -> str | None:
        return self.files.get(path)

    def glob(self, pattern: str) -> list[str]:
        import fnmatch

        return sorted(str(p) for p in self.files if fnmatch.fnmatch(str(p), pattern))

    def is_file(self, path: Path) -> bool:
        return path in self.files or str(path) in self.programs

    def vmm(self) -> HostVMM:
        return self.vmm_found

    def gvproxy(self) -> str | None:
        return self.gvproxy_found


def lines(mac: FakeMac, config_path: Path | None = None) -> dict[str, str]:
    results = doctor.examine(MacChecks(mac, config_path).checks())
    return {result.check.name: result.line for result in results}


def test_a_mac_with_everything_passes_every_check() -> None:
    found = lines(FakeMac())
    assert found == {
        "VMM": f"ok       VMM: {BREW}/qemu-system-aarch64, accelerator hvf",
        "containerd": "ok       containerd: containerd 2.3.0 at /usr/local/bin/containerd",
        "erofs snapshotter": "ok       erofs snapshotter: erofs (no config file (containerd's "
        "defaults))",
        "erofs differ": "ok       erofs differ: erofs, -b4096 by containerd's default (no config "
        "file (containerd's defaults))",
        "mkfs.erofs": f"ok       mkfs.erofs: {BREW}/mkfs.erofs",
        "mkfs.ext4": f"ok       mkfs.ext4: {BREW}/mkfs.ext4",
        "gvproxy": "ok       gvproxy: /opt/homebrew/opt/podman/libexec/podman/gvproxy",
    }
    assert doctor.healthy(doctor.examine(MacChecks(FakeMac()).checks()))


def no_vmm(mac: FakeMac) -> None:
    mac.vmm_found = HostVMM("vfkit", None, None, "brew install vfkit")


def no_containerd(mac: FakeMac) -> None:
    del mac.programs["/usr/local/bin/containerd"]


def no_mkfs_erofs(mac: FakeMac) -> None:
    del mac.programs[f"{BREW}/mkfs.erofs"]


def old_mkfs_erofs(mac: FakeMac) -> None:
    mac.programs[f"{BREW}/mkfs.erofs"] = "usage: [options] FILE DIRECTORY"


def no_mkfs_ext4(mac: FakeMac) -> None:
    del mac.programs[f"{BREW}/mkfs.ext4"]


def keg_only_mkfs_ext4(mac: FakeMac) -> None:
    del mac.programs[f"{BREW}/mkfs.ext4"]
    mac.programs[f"{KEG}/mkfs.ext4"] = "mke2fs 1.47.2"


def no_gvproxy(mac: FakeMac) -> None:
    mac.gvproxy_found = None


def snapshotter_disabled(mac: FakeMac) -> None:
    mac.files[CONFIG] = "version = 3\ndisabled_plugins = ['io.containerd.snapshotter.v1.erofs']\n"


def differ_disabled(mac: FakeMac) -> None:
    mac.files[CONFIG] = "version = 3\ndisabled_plugins = ['io.containerd.differ.v1.erofs']\n"


@pytest.mark.parametrize(
    ("remove", "name", "detail", "fix"),
    [
        (no_vmm, "VMM", "no vfkit on PATH", "brew install vfkit"),
        (no_containerd, "containerd", "no containerd ($HARPOON_CONTAINERD or on PATH)",
         "build containerd 2.2 or later for darwin from source"),
        (no_mkfs_erofs, "mkfs.erofs", "no mkfs.erofs on containerd's PATH (doctor's PATH)",
         "brew install erofs-utils"),
        (old_mkfs_erofs, "mkfs.erofs", f"{BREW}/mkfs.erofs has no --tar",
         "brew install erofs-utils"),
        (no_mkfs_ext4, "mkfs.ext4", "no mkfs.ext4 on containerd's PATH",
         f"brew install e2fsprogs, then add its keg-only sbin ({KEG} or "),
        (keg_only_mkfs_ext4, "mkfs.ext4",
         f"{KEG}/mkfs.ext4 is not on containerd's PATH (doctor's PATH): Homebrew's e2fsprogs "
         "is keg-only", f"{KEG} or /usr/local/opt/e2fsprogs/sbin) to containerd's PATH"),
        (no_gvproxy, "gvproxy", "no gvproxy", "brew install podman"),
        (snapshotter_disabled, "erofs snapshotter",
         f"{CONFIG}: disabled_plugins has io.containerd.snapshotter.v1.erofs",
         f"in {CONFIG}: take io.containerd.snapshotter.v1.erofs out of disabled_plugins"),
        (differ_disabled, "erofs differ",
         f"{CONFIG}: disabled_plugins has io.containerd.differ.v1.erofs",
         f"add to {CONFIG}: [plugins.'io.containerd.differ.v1.erofs'] mkfs_options"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)  # fmt: skip
def test_each_missing_piece_fails_its_check_alone_with_its_fix(
    remove: Callable[[FakeMac], None], name: str, detail: str, fix: str
) -> None:
    mac = FakeMac()
    remove(mac)
    found = lines(mac)
    failed = {check: line for check, line in found.items() if not line.startswith("ok")}
    # Without containerd, its version is unknown: whether the differ has its block size too.
    assert list(failed) == ([name, "erofs differ"] if name == "containerd" else [name])
    assert failed[name].startswith(f"MISSING  {name}: {detail}")
    assert fix in failed[name].split("; fix: ", 1)[1]


def test_containerd_21_is_too_old() -> None:
    found = lines(FakeMac("v2.1.4"))
    assert found["containerd"] == (
        "MISSING  containerd: /usr/local/bin/containerd is containerd 2.1.4: a Mac needs 2.2 or "
        "later (the erofs snapshotter and differ); fix: build containerd 2.2 or later for "
        "darwin from source (README.md, On a Mac: `make binaries` in a containerd checkout, "
        "then install bin/containerd and bin/ctr)"
    )


def test_containerd_22_needs_the_differs_block_size_in_its_config() -> None:
    found = lines(FakeMac("v2.2.1", config="version = 3\n"))
    assert found["containerd"].startswith("ok")
    assert found["erofs differ"] == (
        f"MISSING  erofs differ: {CONFIG}: containerd 2.2.1 makes 16K-block erofs layers the "
        "guest refuses without [plugins.'io.containerd.differ.v1.erofs'] mkfs_options = "
        f"['-b4096']; fix: add to {CONFIG}: [plugins.'io.containerd.differ.v1.erofs'] "
        "mkfs_options = ['-b4096'] (and take it out of disabled_plugins); restart containerd"
    )
    # No config at all is the same on 2.2: the fix names containerd's default path.
    assert "fix: add to /etc/containerd/config.toml" in lines(FakeMac("v2.2.1"))["erofs differ"]


@pytest.mark.parametrize("options", ["['-b4096']", "['-T0', '-b', '4096']"])
def test_containerd_22_with_the_block_size_passes(options: str) -> None:
    config = f"version = 3\n[plugins.'io.containerd.differ.v1.erofs']\n  mkfs_options = {options}\n"
    assert lines(FakeMac("v2.2.1", config))["erofs differ"].startswith("ok       erofs differ: ")


def test_the_block_size_may_come_from_an_imported_file() -> None:
    mac = FakeMac("v2.2.0", config="version = 3\nimports = ['conf.d/*.toml']\n")
    mac.files[Path("/etc/containerd/conf.d/erofs.toml")] = DIFFER_22
    assert lines(mac)["erofs differ"].startswith("ok")


def test_the_config_doctor_is_told_of_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    mac = FakeMac("v2.2.1")
    elsewhere = Path("/Users/me/containerd/config.toml")
    mac.files[elsewhere] = DIFFER_22
    assert lines(mac, elsewhere)["erofs differ"].startswith("ok")
    mac.environ["HARPOON_CONTAINERD_CONFIG"] = str(elsewhere)
    assert lines(mac)["erofs differ"].startswith("ok")


def test_another_snapshotter_for_harpoons_images_or_runtime_fails() -> None:
    config = """version = 3
[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = 'linux/arm64'
  snapshotter = 'native'
  differ = 'walking'
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.harpoon]
  runtime_type = 'io.containerd.harpoon.v1'
  snapshotter = 'blockfile'
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.other]
  runtime_type = 'io.containerd.nerdbox.v1'
  snapshotter = 'native'
"""
    found = lines(FakeMac(config=config))["erofs snapshotter"]
    assert found.startswith(
        f"MISSING  erofs snapshotter: {CONFIG}: unpack_config linux/arm64 uses the native "
        "snapshotter; runtime harpoon uses the blockfile snapshotter; fix: "
    )


def test_a_config_that_is_not_toml_fails_both_config_checks_naming_it() -> None:
    found = lines(FakeMac(config="[plugins\n"))
    for name in ("erofs snapshotter", "erofs differ"):
        assert found[name].startswith(f"MISSING  {name}: {CONFIG} is not TOML: ")


def test_containerds_own_path_is_where_mkfs_is_looked_for() -> None:
    mac = FakeMac()
    mac.programs[f"{KEG}/mkfs.ext4"] = "mke2fs"
    del mac.programs[f"{BREW}/mkfs.ext4"]
    mac.environ["HARPOON_CONTAINERD_PATH"] = f"{BREW}:{KEG}:/usr/bin"
    found = lines(mac)
    assert found["mkfs.ext4"] == f"ok       mkfs.ext4: {KEG}/mkfs.ext4"
    del mac.programs[f"{BREW}/mkfs.erofs"]
    found = lines(mac)
    assert found["mkfs.erofs"].startswith(
        "MISSING  mkfs.erofs: no mkfs.erofs on containerd's PATH ($HARPOON_CONTAINERD_PATH)"
    )


def test_the_mac_checks_replace_linuxs_and_linux_keeps_its_own() -> None:
    assert doctor.checks_for("linux") == doctor.CHECKS
    names = [check.name for check in doctor.checks_for("darwin")]
    assert names == [
        "guest image", "VM templates", "shim", "VMM", "containerd", "erofs snapshotter",
        "erofs differ", "mkfs.erofs", "mkfs.ext4", "gvproxy",
    ]  # fmt: skip
