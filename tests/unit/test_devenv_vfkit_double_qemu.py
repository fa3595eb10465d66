"""The vfkit double's checks on disk (vfkit's and VZ's refusals), its QEMU command line,
and the `vfkit` wrapper tests put on PATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harpoon.devenv import vfkit_double
from harpoon.devenv.vfkit_double import checks, cmdline, devices, qemu
from harpoon.devenv.vfkit_double.checks import ConfigurationError

ARM64_IMAGE_HEAD = bytes(0x38) + b"ARMd" + bytes(16)
X86_ELF_HEAD = b"\x7fELF" + bytes(14) + (62).to_bytes(2, "little") + bytes(40)
BZIMAGE_HEAD = bytes(0x202) + b"HdrS" + bytes(16)


@pytest.fixture
def boot_files(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.cpio"
    kernel.write_bytes(X86_ELF_HEAD)
    initrd.write_bytes(b"070701")
    return kernel, initrd


def options_for(kernel: Path, initrd: Path, *extra: str) -> cmdline.Options:
    command = cmdline.parse(["--bootloader", f"linux,kernel={kernel},initrd={initrd}", *extra])
    assert isinstance(command, cmdline.Options)
    return command


def test_the_mac_played_follows_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    assert checks.guest_arch(X86_ELF_HEAD, None) == "amd64"
    assert checks.guest_arch(BZIMAGE_HEAD, None) == "amd64"
    assert checks.guest_arch(ARM64_IMAGE_HEAD, None) == "arm64"
    assert checks.guest_arch(b"\x1f\x8b compressed", None) == "arm64"  # refused next
    assert checks.guest_arch(X86_ELF_HEAD, "arm64") == "arm64"
    with pytest.raises(ConfigurationError, match="use amd64 or arm64"):
        checks.guest_arch(X86_ELF_HEAD, "riscv64")


def test_a_compressed_arm64_kernel_is_refused(
    boot_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, initrd = boot_files
    kernel.write_bytes(b"MZ\x00\x00 an EFI zboot or gzip image" + bytes(100))
    with pytest.raises(ConfigurationError) as caught:
        checks.check_vm(options_for(kernel, initrd))
    assert str(caught.value) == f"kernel must be uncompressed, {kernel} is a compressed file"
    kernel.write_bytes(ARM64_IMAGE_HEAD)
    assert checks.check_vm(options_for(kernel, initrd)) == "arm64"
    # An Apple-silicon Mac refuses an x86 kernel the same way.
    kernel.write_bytes(X86_ELF_HEAD)
    monkeypatch.setenv(checks.ARCH_ENV, "arm64")
    with pytest.raises(ConfigurationError, match="kernel must be uncompressed"):
        checks.check_vm(options_for(kernel, initrd))


def test_the_kernel_and_the_initrd_must_exist(boot_files: tuple[Path, Path]) -> None:
    kernel, initrd = boot_files
    with pytest.raises(ConfigurationError) as caught:
        checks.check_vm(options_for(kernel, kernel.parent / "none"))
    assert str(caught.value) == (
        f"invalid initial RAM disk path: stat {kernel.parent}/none: no such file or directory"
    )
    with pytest.raises(ConfigurationError, match="invalid linux kernel path: stat"):
        checks.check_vm(options_for(kernel.parent / "none", initrd))
    no_initrd = cmdline.Options(cmdline.LinuxBootloader(str(kernel), "", ""))
    with pytest.raises(ConfigurationError, match="invalid initial RAM disk path: stat : no such"):
        checks.check_vm(no_initrd)


def test_disks_must_be_raw_and_their_ids_fit_virtio(
    boot_files: tuple[Path, Path], tmp_path: Path
) -> None:
    kernel, initrd = boot_files
    image = tmp_path / "disk.img"

    def check(*device: str) -> None:
        checks.check_vm(options_for(kernel, initrd, *device))

    image.write_bytes(b"QFI\xfb\x00\x00\x00\x03")
    with pytest.raises(ConfigurationError, match="vfkit does not support qcow2 image format"):
        check("--device", f"virtio-blk,path={image}")
    image.write_bytes(b"")
    with pytest.raises(ConfigurationError, match=f"failed to read the header of file {image}: EOF"):
        check("--device", f"virtio-blk,path={image}")
    with pytest.raises(ConfigurationError, match="failed to open file"):
        check("--device", f"virtio-blk,path={tmp_path}/none.img")
    image.write_bytes(bytes(512))
    check("--device", f"virtio-blk,path={image},deviceId={'d' * 20}")
    with pytest.raises(ConfigurationError, match="20 bytes or less"):
        check("--device", f"virtio-blk,path={image},deviceId={'d' * 21}")


def test_shared_directories_must_exist_and_tags_fit(
    boot_files: tuple[Path, Path], tmp_path: Path
) -> None:
    kernel, initrd = boot_files
    with pytest.raises(ConfigurationError, match=f"stat {tmp_path}/none: no such file"):
        checks.check_vm(options_for(kernel, initrd, "-d", f"virtio-fs,sharedDir={tmp_path}/none"))
    with pytest.raises(ConfigurationError, match="1 to 36 bytes"):
        checks.check_vm(
            options_for(kernel, initrd, "-d", f"virtio-fs,sharedDir={tmp_path},mountTag={'t' * 37}")
        )


def test_the_qemu_command_line_maps_each_vfkit_device(boot_files: tuple[Path, Path]) -> None:
    kernel, initrd = boot_files
    options = options_for(
        kernel, initrd,
        "--cpus", "2", "--memory", "768",
        "-d", "virtio-serial,logFilePath=/s/console.log",
        "-d", "virtio-vsock,port=1025,socketURL=/s/agent.sock,connect",
        "-d", "virtio-fs,sharedDir=/data,mountTag=data",
        "-d", "virtio-blk,path=/s/layer.erofs,deviceId=layer0,readonly",
        "-d", "virtio-net,unixSocketPath=/s/net.sock",
        "-d", "virtio-rng",
    )  # fmt: skip
    wiring = qemu.Wiring(
        qmp_fd=5,
        vsock_socket=Path("/p/vhost-vsock.sock"),
        virtiofs_sockets=(Path("/p/virtiofs-0.sock"),),
        nic_fds=(7,),
        nic_macs=("5a:94:ef:e4:0c:ee",),
    )

    argv = qemu.command_line(options, "amd64", "tcg", wiring)
    line = " ".join(argv)

    assert argv[0] == "qemu-system-x86_64"
    assert "-M microvm,rtc=on,x-option-roms=off,memory-backend=ram" in line
    assert "memory-backend-memfd,id=ram,size=768M,share=on" in line
    assert "-smp 2" in line and "-m 768M" in line and " -S " in line
    assert argv[argv.index("-append") + 1] == "tsc_early_khz=2000000 tsc=reliable"
    # The log is truncated, as VZ's (vfkit asks for no append).
    assert "file,id=con0,path=/s/console.log,append=off" in line
    assert "virtconsole,bus=vser0.0,chardev=con0" in line
    assert "vhost-user-vsock-device,chardev=vsock" in line
    assert "socket,id=vsock,path=/p/vhost-vsock.sock" in line
    assert "vhost-user-fs-device,chardev=fs0,tag=data" in line
    assert "driver=file,node-name=blk0,filename=/s/layer.erofs,read-only=on" in line
    assert "virtio-blk-device,drive=blk0,serial=layer0" in line
    assert "dgram,id=net0,local.type=fd,local.str=7" in line
    assert "virtio-net-device,netdev=net0,mac=5a:94:ef:e4:0c:ee" in line
    assert "virtio-rng-device,rng=rng0" in line
    assert "socket,id=qmp,fd=5,server=on,wait=off" in line


def test_arm64_runs_on_virt_and_kvm_guests_get_no_tcg_arguments(
    boot_files: tuple[Path, Path],
) -> None:
    kernel, initrd = boot_files
    options = cmdline.Options(
        cmdline.LinuxBootloader(str(kernel), str(initrd), "console=hvc0"), devices=()
    )
    arm = qemu.command_line(options, "arm64", "tcg", qemu.Wiring(qmp_fd=3))
    assert arm[0] == "qemu-system-aarch64"
    assert "cortex-a72" in arm and arm[arm.index("-append") + 1] == "console=hvc0"
    kvm = qemu.command_line(options, "amd64", "kvm", qemu.Wiring(qmp_fd=3))
    assert kvm[kvm.index("-append") + 1] == "console=hvc0"
    assert kvm[kvm.index("-cpu") + 1] == "host"
    assert not any(arg.startswith("virtio-serial") for arg in kvm)


def test_the_wrapper_runs_the_double_as_vfkit(tmp_path: Path) -> None:
    wrapper = vfkit_double.install_wrapper(tmp_path / "bin")
    assert wrapper == tmp_path / "bin" / "vfkit" and os.access(wrapper, os.X_OK)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    version = subprocess.run(
        [wrapper, "--version"], capture_output=True, text=True, env=environment, timeout=60
    )
    refusal = subprocess.run(
        [wrapper, "--device", "virtio-fs,sharedDir=/x,readonly"],
        capture_output=True, text=True, env=environment, timeout=60,
    )  # fmt: skip

    assert (version.returncode, version.stdout) == (0, f"vfkit version: {cmdline.VERSION}\n")
    assert refusal.returncode == 1
    assert refusal.stderr == (
        "Error: unknown option for virtio-fs devices: readonly\n"
        "unknown option for virtio-fs devices: readonly\n"
    )


def test_values_in_qemu_options_have_their_commas_doubled() -> None:
    assert qemu.option_value("/a,b/c") == "/a,,b/c"
    assert devices.VirtioFs("/x", "").tag == "x"
