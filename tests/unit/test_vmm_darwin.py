"""QEMU on macOS (HVF), checked on Linux: the host is a parameter of the command line and
of the accelerator's choice; what Linux alone has (parent-death signal, network
namespaces, virtiofsd, /proc) is not used there."""

from __future__ import annotations

import dataclasses
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from harpoon import linux
from harpoon.vmm import accel, backend, leftovers, qemu_launch, virtiofsd
from harpoon.vmm.base import VMConfig, VMError
from harpoon.vmm.devices import NIC, Share, StreamBackend
from harpoon.vmm.process import VmmProcess, die_with_parent
from harpoon.vmm.qemu_launch import Host, command_line

MAC_ARM = Host("darwin", "arm64")
MAC_INTEL = Host("darwin", "amd64")
BASE_ARGS = "quiet panic=-1 rdinit=/init random.trust_cpu=on cryptomgr.notests PYTHONHASHSEED=0"
X86_ARGS = "tsc_early_khz=2000000 tsc=reliable"


def config(arch: str, **overrides: object) -> VMConfig:
    values: dict[str, object] = dict(
        name="web",
        arch=arch,
        kernel=Path("/g/Image" if arch == "arm64" else "/g/vmlinux"),
        initrd=Path("/g/initrd"),
        state_dir=Path("/r/vm/w"),
        shares=(Share("rootfs", Path("/s/rootfs")),),
    )
    values.update(overrides)
    return VMConfig(**values)  # type: ignore[arg-type]


def common(console: str, kernel: str, serial_device: str, append: str) -> list[str]:
    """The argv from -m to -pidfile, which every machine shares."""
    return [
        "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-kernel", kernel, "-initrd", "/g/initrd",
        "-append", f"console={console} {append}",
        "-chardev", "file,id=console,path=/r/vm/w/console.log", "-serial", "chardev:console",
        "-chardev", "socket,id=agent,path=/r/vm/w/agent.sock,server=on,wait=off",
        "-device", serial_device,
        "-device", "virtserialport,chardev=agent,name=harpoon.agent,id=agent-port",
        "-chardev", "socket,id=stdio,path=/r/vm/w/stdio.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=stdio,name=harpoon.stdio,id=stdio-port",
        "-chardev", "socket,id=qmp,path=/r/vm/w/vmm.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control", "-pidfile", "/r/vm/w/vmm.pid",
    ]  # fmt: skip


def test_apple_silicon_runs_arm64_guests_on_virt_under_hvf_with_the_host_cpu() -> None:
    nic = NIC("eth0", "02:00:00:00:00:00", StreamBackend(Path("/r/vm/w/gv.sock")))
    argv = command_line(config("arm64", nics=(nic,)), "hvf", host=MAC_ARM)
    assert argv == [
        "qemu-system-aarch64", "-M", "virt", "-accel", "hvf",
        *common("ttyAMA0", "/g/Image", "virtio-serial-device", BASE_ARGS),
        "-cpu", "host",
        "-fsdev", "local,id=fs0,path=/s/rootfs,security_model=none,multidevs=remap",
        "-device", "virtio-9p-device,fsdev=fs0,mount_tag=rootfs",
        "-netdev", "stream,id=net-eth0,server=off,addr.type=unix,addr.path=/r/vm/w/gv.sock",
        "-device", "virtio-net-device,netdev=net-eth0,mac=02:00:00:00:00:00",
    ]  # fmt: skip


def test_an_intel_mac_runs_amd64_guests_on_q35_under_hvf() -> None:
    argv = command_line(config("amd64"), "hvf", host=MAC_INTEL)
    assert argv == [
        "qemu-system-x86_64", "-M", "q35", "-accel", "hvf",
        *common("ttyS0", "/g/vmlinux", "virtio-serial-pci,addr=0x2.0,multifunction=on",
                f"{BASE_ARGS} {X86_ARGS}"),
        "-cpu", "host",
        "-fsdev", "local,id=fs0,path=/s/rootfs,security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs,addr=0x2.1",
    ]  # fmt: skip
    # The same config on Linux keeps microvm: the default differs by host alone.
    linux_argv = command_line(config("amd64"), "kvm", host=Host("linux", "amd64"))
    assert linux_argv[1:3] == ["-M", "microvm,rtc=on,x-option-roms=off"]


def test_an_intel_mac_runs_microvm_under_hvf_when_the_config_names_it() -> None:
    argv = command_line(config("amd64", machine="microvm"), "hvf", host=MAC_INTEL)
    assert argv == [
        "qemu-system-x86_64", "-M", "microvm,rtc=on,x-option-roms=off", "-accel", "hvf",
        *common("ttyS0", "/g/vmlinux", "virtio-serial-device", f"{BASE_ARGS} {X86_ARGS}"),
        "-cpu", "host",
        "-fsdev", "local,id=fs0,path=/s/rootfs,security_model=none,multidevs=remap",
        "-device", "virtio-9p-device,fsdev=fs0,mount_tag=rootfs",
    ]  # fmt: skip


def test_an_amd64_guest_on_apple_silicon_is_emulated() -> None:
    argv = command_line(config("amd64"), "hvf", host=MAC_ARM)
    assert argv[1:5] == ["-M", "q35", "-accel", "tcg,thread=multi"]
    assert "-cpu" not in argv


def test_a_template_restores_on_a_mac_from_its_memory_file() -> None:
    """Templates as on Linux: the RAM is a memory-backend-file (no memfd)."""
    vm = config("arm64", memory_file=Path("/t/memory"))
    booting = command_line(vm, "hvf", host=MAC_ARM)
    restoring = command_line(vm, "hvf", host=MAC_ARM, restoring=True)
    assert booting[1:3] == ["-M", "virt,memory-backend=ram"]
    at = booting.index("-object")
    assert booting[at : at + 2] == [
        "-object", "memory-backend-file,id=ram,size=256M,mem-path=/t/memory,share=on",
    ]  # fmt: skip
    assert restoring[restoring.index("-object") + 1].endswith("share=off")


def test_a_virtiofs_share_is_refused_on_a_mac() -> None:
    vm = config("arm64", shares=(Share("rootfs", Path("/s/rootfs"), fs="virtiofs"),))
    with pytest.raises(VMError, match="no virtiofs share on macOS"):
        command_line(vm, "hvf", host=MAC_ARM)
    assert "memory-backend-memfd" in " ".join(command_line(vm, "kvm", host=Host("linux", "arm64")))


def test_no_virtiofsd_is_found_on_a_mac_so_qemu_serves_no_virtiofs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(virtiofsd.BINARY_ENV, str(fake))
    assert virtiofsd.find() == str(fake)
    assert virtiofsd.find("darwin") is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not backend.QemuBackend().serves_virtiofs()


def test_qemus_fix_on_a_mac_is_homebrew(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda program: None)
    assert "apt-get install" in backend.QemuBackend().host_vmm().install_hint
    monkeypatch.setattr(sys, "platform", "darwin")
    vmm = backend.QemuBackend().host_vmm()
    assert (vmm.path, vmm.accelerator, vmm.install_hint) == (None, None, "brew install qemu")


# -- the accelerator --------------------------------------------------------------------


def test_macs_accelerator_is_hvf_probed_on_a_guestless_machine() -> None:
    assert accel.hardware_accelerator("darwin") == "hvf"
    assert accel.hardware_accelerator("linux") == "kvm"
    assert accel.probe_argv("/opt/homebrew/bin/qemu-system-aarch64", "hvf") == [
        "/opt/homebrew/bin/qemu-system-aarch64", "-accel", "hvf", "-cpu", "host", "-M", "none",
        "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
    ]  # fmt: skip


@pytest.mark.parametrize(("works", "verdict"), [(True, "hvf"), (False, "tcg")])
def test_choose_probes_hvf_on_a_mac_and_falls_back_to_tcg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, works: bool, verdict: str
) -> None:
    monkeypatch.delenv(accel.ACCEL_ENV, raising=False)
    monkeypatch.setattr(accel, "CACHE_DIR", tmp_path)
    probed: list[str] = []

    def probe(qemu: str, accelerator: str) -> bool:
        probed.append(accelerator)
        return works

    monkeypatch.setattr(accel, "probe", probe)
    assert accel.choose("/q", platform="darwin") == verdict
    assert accel.choose("/q", platform="darwin") == verdict  # the cached verdict
    assert probed == ["hvf"]


# -- what macOS lacks ---------------------------------------------------------------------


def test_no_parent_death_signal_is_a_clear_error_not_a_missing_symbol(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linux, "HAS_PARENT_DEATH_SIGNAL", False)
    with pytest.raises(OSError) as raised:
        linux.set_parent_death_signal(9)
    assert raised.value.errno == errno.ENOSYS


def test_a_vmm_is_spawned_without_a_parent_death_signal_where_there_is_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(signal_number: int) -> None:
        raise OSError(errno.ENOSYS, "called where there is no parent-death signal")

    monkeypatch.setattr(linux, "set_parent_death_signal", refuse)
    with pytest.raises(subprocess.SubprocessError):  # the guard is what is tested
        VmmProcess.spawn(["true"], stderr_path=tmp_path / "log1", preexec=die_with_parent)
    monkeypatch.setattr(linux, "HAS_PARENT_DEATH_SIGNAL", False)
    process = VmmProcess.spawn(["true"], stderr_path=tmp_path / "log2", preexec=die_with_parent)
    assert process._popen.wait(timeout=10) == 0


def test_a_network_namespace_is_refused_before_anything_is_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(linux, "HAS_NETWORK_NAMESPACES", False)
    monkeypatch.setattr(qemu_launch, "find_binary", lambda vm: "/bin/true")
    vm = config("arm64", state_dir=tmp_path / "vm" / "w", netns=Path("/var/run/netns/x"))
    vm = dataclasses.replace(vm, machine="virt")
    with pytest.raises(VMError, match="network namespace /var/run/netns/x"):
        qemu_launch.launch(vm)
    assert not (tmp_path / "vm").exists()


def test_delete_finds_and_kills_a_dead_shims_vmm_through_ps_where_there_is_no_proc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """macOS's replacement for the parent-death signal: `shim delete` kills the VMM its
    pid file names, if its command line names the VM's state directory."""
    monkeypatch.setattr(leftovers, "HAS_PROC", False)
    state = tmp_path / "vm dir"  # a space: ps's command column splits it
    state.mkdir()
    vmm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(state)])
    other = subprocess.Popen(["sleep", "61"])
    try:
        (state / leftovers.PID_FILE_NAME).write_text(f"{other.pid}\n")
        assert leftovers.kill_vmm(str(state)) == other.pid
        assert other.poll() is None, "a recycled pid that is not the VM's is left alone"
        (state / leftovers.PID_FILE_NAME).write_text(f"{vmm.pid}\n")
        assert leftovers.kill_vmm(str(state)) == vmm.pid
        assert vmm.wait(timeout=5) == -9
        assert not leftovers._running(vmm.pid)
    finally:
        for process in (vmm, other):
            process.kill()
            process.wait()
