"""vfkit's command line (harpoon.vmm.vfkit_launch) for every kind of device, what it
refuses, and the VMs VfkitBackend fits: pure, no vfkit run."""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import pytest

from harpoon.vmm import vfkit_launch
from harpoon.vmm.backend import VfkitBackend
from harpoon.vmm.base import VMConfig, VMError
from harpoon.vmm.devices import NIC, Disk, Share, StreamBackend, TapBackend, Vsock
from harpoon.vmm.kernel_args import BASE_KERNEL_ARGS
from harpoon.vmm.vfkit_launch import check, command_line, fit

STATE = Path("/run/harpoon/vm/c1")


def config(**fields: object) -> VMConfig:
    base = VMConfig(
        name="c1", arch="arm64", kernel=Path("/guest/vmlinuz"), initrd=Path("/guest/initrd"),
        state_dir=STATE, cpus=2, memory_mib=384,
    )  # fmt: skip
    return replace(base, **fields)  # type: ignore[arg-type]


def devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--device"]


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_command_line_of_a_vm_without_devices() -> None:
    argv = command_line(config(), "/opt/vfkit")
    assert argv[0] == "/opt/vfkit"
    assert (option(argv, "--cpus"), option(argv, "--memory")) == ("2", "384")
    assert option(argv, "--restful-uri") == f"unix://{STATE}/vfkit-rest.sock"
    # The console first (hvc0's log), then the agent's two vsock ports, host -> guest.
    assert devices(argv) == [
        f"virtio-serial,logFilePath={STATE}/console.log",
        f"virtio-vsock,port=1025,socketURL={STATE}/agent.sock,connect",
        f"virtio-vsock,port=1026,socketURL={STATE}/stdio.sock,connect",
    ]
    # harpoon writes the pid file itself, at once (harpoon.vmm.leftovers reads it).
    assert "--pidfile" not in argv


def test_the_kernel_command_line_is_quoted_whole_with_hvc0_and_the_base_arguments() -> None:
    argv = command_line(config(kernel_args=("harpoon.debug=1", "a=b,c")))
    bootloader = option(argv, "--bootloader")
    cmdline = " ".join(("console=hvc0", *BASE_KERNEL_ARGS, "harpoon.debug=1", "a=b,c"))
    assert bootloader == f'linux,kernel=/guest/vmlinuz,initrd=/guest/initrd,cmdline="{cmdline}"'
    # Split as vfkit splits it (pkg/cmdline/string_slice.go: commas outside quotes),
    # the cmdline is one option, its comma kept.
    assert _vfkit_split(bootloader)[3] == f'cmdline="{cmdline}"'


def _vfkit_split(value: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def test_a_kernel_argument_with_a_double_quote_is_refused() -> None:
    with pytest.raises(VMError, match=r"kernel argument 'x=\"y\"'"):
        command_line(config(kernel_args=('x="y"',)))


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_either_architecture_boots_its_kernel_the_same_way(arch: str) -> None:
    # vfkit has no machine types: the architecture is the host's (or, in the double,
    # the kernel's); the command line names the kernel and nothing else differs.
    argv = command_line(config(arch=arch, kernel=Path(f"/guest/{arch}/kernel")))
    assert option(argv, "--bootloader").startswith(f"linux,kernel=/guest/{arch}/kernel,")
    assert "tsc" not in option(argv, "--bootloader")  # QEMU's x86 TCG arguments are QEMU's


def test_shares_disks_and_gvproxy_nics_by_their_ids() -> None:
    argv = command_line(
        config(
            shares=(Share("rootfs", Path("/run/harpoon/share/c1"), fs="virtiofs"),),
            disks=(
                Disk("layer-0", Path("/snap/0.erofs")),
                Disk("rw", Path("/snap/rw.ext4"), False),
            ),
            nics=(NIC("eth0", "02:00:00:00:00:01", StreamBackend(STATE / "x.sock", gvproxy=True)),),
        )
    )
    assert devices(argv)[3:] == [
        "virtio-fs,sharedDir=/run/harpoon/share/c1,mountTag=rootfs",
        # The guest finds a disk by its serial: vfkit's deviceId.
        "virtio-blk,path=/snap/0.erofs,deviceId=layer-0,readonly",
        "virtio-blk,path=/snap/rw.ext4,deviceId=rw",
        # A gvproxy of the VM's own, in its state directory (-listen-vfkit).
        f"virtio-net,unixSocketPath={STATE}/gvproxy-net.sock,mac=02:00:00:00:00:01",
    ]


def test_fit_makes_every_share_virtiofs_and_the_backend_serves_them() -> None:
    backend = VfkitBackend()
    asked = config(shares=(Share("rootfs", Path("/s")),))
    assert asked.shares[0].fs == "9p"
    fitted = backend.fit(asked)
    assert [share.fs for share in fitted.shares] == ["virtiofs"]
    assert backend.fit(asked) == fitted  # the same answer each time
    assert backend.serves_virtiofs()
    assert backend.template_identity(fitted) is None  # vfkit cannot restore: no templates
    with pytest.raises(VMError, match="share rootfs is 9p; vfkit serves virtiofs only"):
        command_line(asked)


def test_a_tap_nic_is_refused_naming_it() -> None:
    tap = config(nics=(NIC("eth0", "02:00:00:00:00:01", TapBackend("tap0")),))
    with pytest.raises(VMError, match="NIC eth0 is tap device tap0; vfkit opens no tap"):
        fit(tap)
    with pytest.raises(VMError, match="NIC eth0 is tap device tap0"):
        command_line(tap)


def test_a_stream_nic_of_another_process_is_refused() -> None:
    other = config(nics=(NIC("eth1", "02:00:00:00:00:02", StreamBackend(Path("/gv.sock"))),))
    with pytest.raises(VMError, match=r"NIC eth1 is a stream socket \(/gv.sock\)"):
        fit(other)


def test_a_read_only_share_is_served_writable_since_vfkit_has_no_other_kind() -> None:
    """fit serves it writable (the guest mounts it read-only: Share.read_only says so);
    a read-only share given to vfkit's command line as it is is refused."""
    read_only = config(shares=(Share("data", Path("/d"), fs="virtiofs", read_only=True),))
    assert [share.read_only for share in fit(read_only).shares] == [False]
    with pytest.raises(VMError, match="share data is read-only, and vfkit shares are always"):
        check(read_only)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"machine": "q35"}, "machine 'q35' is QEMU's"),
        ({"memory_file": Path("/m")}, "guest RAM in a file"),
        ({"vsock": Vsock(7)}, "asked for CID 7"),
    ],
)
def test_what_only_qemu_has_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(VMError, match=message):
        fit(config(**fields))


def test_a_path_with_a_comma_or_a_socket_path_vfkit_would_escape_is_refused() -> None:
    with pytest.raises(VMError, match="disk d /img,1: vfkit splits its options at commas"):
        command_line(config(disks=(Disk("d", Path("/img,1")),)))
    with pytest.raises(VMError, match=r"vsock socket /run/a b/c1/agent\.sock: vfkit makes a URL"):
        command_line(config(state_dir=Path("/run/a b/c1")))


def test_an_arm64_kernel_must_be_an_uncompressed_image(tmp_path: Path) -> None:
    image = bytearray(64)
    image[vfkit_launch.ARM64_IMAGE_MAGIC_OFFSET : 0x3C] = b"ARMd"
    (tmp_path / "Image").write_bytes(bytes(image))
    (tmp_path / "vmlinuz").write_bytes(gzip.compress(bytes(image)))
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    (tmp_path / "initrd").write_bytes(b"070701")
    guest = config(initrd=tmp_path / "initrd", arch="arm64")
    vfkit_launch.check_guest(replace(guest, kernel=tmp_path / "Image"))
    with pytest.raises(VMError, match="is not an uncompressed arm64 Image"):
        vfkit_launch.check_guest(replace(guest, kernel=tmp_path / "vmlinuz"))
    with pytest.raises(VMError, match="no initrd at"):
        vfkit_launch.check_guest(replace(guest, kernel=tmp_path / "Image", initrd=tmp_path / "x"))
    if not vfkit_launch.IS_MACOS:  # on a Mac an amd64 guest needs an Intel Mac
        # vfkit checks arm64 kernels alone: an x86 ELF vmlinux passes.
        vfkit_launch.check_guest(replace(guest, arch="amd64", kernel=tmp_path / "vmlinux"))


def test_the_program_is_harpoon_vfkit_then_the_config_files_then_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = tmp_path / "vfkit"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.delenv(vfkit_launch.PROGRAM_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert vfkit_launch.find_program() == str(program)
    assert vfkit_launch.find_program("/nonexistent/vfkit") is None  # named, not there
    monkeypatch.setenv(vfkit_launch.PROGRAM_ENV, str(program))
    assert vfkit_launch.find_program("/nonexistent/vfkit") == str(program)
