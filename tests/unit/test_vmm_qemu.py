"""The QEMU command line harpoon builds, checked without starting QEMU."""

from pathlib import Path

import pytest

from harpoon import linux
from harpoon.vmm.base import VMConfig, VMError
from harpoon.vmm.devices import NIC, DeviceError, Disk, Share, StreamBackend, TapBackend, Vsock
from harpoon.vmm.qemu_launch import command_line


def config(**overrides: object) -> VMConfig:
    values: dict[str, object] = dict(
        name="c1",
        arch="amd64",
        kernel=Path("/g/vmlinux"),
        initrd=Path("/g/initrd"),
        state_dir=Path("/run/harpoon/vm/x"),
        shares=(Share("rootfs", Path("/b/rootfs"), read_only=True),),
    )
    values.update(overrides)
    return VMConfig(**values)  # type: ignore[arg-type]


def test_microvm_with_pvh_kernel_virtio_serial_agent_and_9p_rootfs() -> None:
    argv = command_line(config(), "tcg")
    line = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-M microvm" in line and "-accel tcg,thread=multi" in line
    assert "-kernel /g/vmlinux" in line and "-initrd /g/initrd" in line
    assert "socket,id=agent,path=/run/harpoon/vm/x/agent.sock,server=on,wait=off" in line
    assert "virtserialport,chardev=agent,name=harpoon.agent" in line
    assert "local,id=fs0,path=/b/rootfs,security_model=none,multidevs=remap,readonly=on" in line
    assert "virtio-9p-device,fsdev=fs0,mount_tag=rootfs" in line
    assert "-no-reboot" in argv and "-cpu" not in argv


def test_hardware_acceleration_uses_the_host_cpu() -> None:
    argv = command_line(config(), "kvm")
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"


def test_q35_uses_pci_devices() -> None:
    line = " ".join(command_line(config(machine="q35"), "tcg"))
    assert "virtio-serial-pci" in line and "virtio-9p-pci" in line


def test_arm64_guests_are_emulated_on_virt() -> None:
    argv = command_line(config(arch="arm64"), "kvm")
    line = " ".join(argv)
    assert argv[0] == "qemu-system-aarch64" and "-M virt" in line
    assert "console=ttyAMA0" in line and "-cpu cortex-a72" in line


def test_unknown_machine_is_a_clear_error() -> None:
    with pytest.raises(VMError, match="no QEMU machine profile"):
        command_line(config(arch="riscv64"), "tcg")


def test_mount_options_split_into_flags_and_data() -> None:
    flags, propagation, data = linux.parse_mount_options(
        ["ro", "rbind", "nosuid", "index=off", "lowerdir=/a:/b", "rprivate"]
    )
    assert flags == linux.MS_RDONLY | linux.MS_BIND | linux.MS_REC | linux.MS_NOSUID
    assert propagation == linux.MS_PRIVATE | linux.MS_REC
    assert data == "index=off,lowerdir=/a:/b"


def test_microvm_falls_back_to_q35_only_where_qemu_lacks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from harpoon.vmm import qemu_launch as qemu

    monkeypatch.setattr(qemu, "supported_machines", lambda binary: frozenset({"q35", "pc"}))
    assert qemu.with_available_machine(config(), "qemu").machine == "q35"
    monkeypatch.setattr(qemu, "supported_machines", lambda binary: frozenset({"microvm", "q35"}))
    assert qemu.with_available_machine(config(), "qemu").machine is None


def test_the_installed_qemu_lists_its_machines() -> None:
    import shutil

    from harpoon.vmm.qemu_launch import supported_machines

    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("QEMU is not installed")
    assert {"microvm", "q35"} <= supported_machines(binary)


def test_a_memory_file_is_shared_when_booting_and_private_when_restoring() -> None:
    memory = Path("/t/memory")
    booting = command_line(config(memory_file=memory, memory_mib=512), "tcg")
    restoring = command_line(config(memory_file=memory, memory_mib=512), "tcg", restoring=True)
    for argv, share in ((booting, "on"), (restoring, "off")):
        assert argv[argv.index("-M") + 1].endswith(",memory-backend=ram")
        assert argv[argv.index("-m") + 1] == "512M"
        backend = argv[argv.index("-object") + 1]
        assert backend == f"memory-backend-file,id=ram,size=512M,mem-path=/t/memory,share={share}"
    plain = command_line(config(), "tcg")
    assert "-object" not in plain and "memory-backend" not in " ".join(plain)


def test_disks_nics_and_vsock_on_the_command_line_by_id() -> None:
    argv = command_line(
        config(
            disks=(
                Disk("layer0", Path("/l/a,b.erofs")),
                Disk("rw", Path("/l/rw"), read_only=False),
            ),
            nics=(
                NIC("eth0", "02:00:00:00:00:01", TapBackend("tap7")),
                NIC("eth1", "02:00:00:00:00:02", StreamBackend(Path("/run/gv.sock"))),
            ),
            vsock=Vsock(9),
        ),
        "tcg",
    )
    line = " ".join(argv)
    # Commas in a path are doubled, as QEMU's option parser wants.
    assert "driver=file,node-name=disk-layer0,filename=/l/a,,b.erofs,read-only=on" in line
    assert "virtio-blk-device,drive=disk-layer0,serial=layer0" in line
    assert "driver=file,node-name=disk-rw,filename=/l/rw -device" in line
    assert "tap,id=net-eth0,ifname=tap7,script=no,downscript=no" in line
    assert "virtio-net-device,netdev=net-eth0,mac=02:00:00:00:00:01" in line
    assert "stream,id=net-eth1,server=off,addr.type=unix,addr.path=/run/gv.sock" in line
    assert "vhost-vsock-device,guest-cid=9" in line


def test_a_virtiofs_share_is_a_vhost_user_fs_device_on_shared_memory() -> None:
    shares = (Share("rootfs", Path("/b/rootfs")), Share("data", Path("/d"), fs="virtiofs"))
    argv = command_line(config(shares=shares, memory_mib=512), "tcg")
    line = " ".join(argv)
    # vhost-user: virtiofsd maps the guest's RAM, so the RAM is a shared memfd.
    assert "-M microvm,rtc=on,x-option-roms=off,memory-backend=ram " in line
    assert "-object memory-backend-memfd,id=ram,size=512M,share=on" in line
    assert "-chardev socket,id=vfs1,path=/run/harpoon/vm/x/vfs-data.sock -device" in line
    assert "-device vhost-user-fs-device,chardev=vfs1,tag=data" in line
    # The 9p share beside it is as before.
    assert "virtio-9p-device,fsdev=fs0,mount_tag=rootfs" in line


def test_a_virtiofs_share_on_q35_is_pci() -> None:
    shares = (Share("rootfs", Path("/b"), fs="virtiofs"),)
    line = " ".join(command_line(config(shares=shares, machine="q35"), "tcg"))
    assert "-M q35,memory-backend=ram" in line
    assert "vhost-user-fs-pci,chardev=vfs0,tag=rootfs" in line


def test_a_vm_without_virtiofs_has_no_shared_memory() -> None:
    line = " ".join(command_line(config(), "tcg"))
    assert "memory-backend" not in line and "vhost-user" not in line


def test_a_virtiofs_share_cannot_be_restored() -> None:
    shares = (Share("data", Path("/d"), fs="virtiofs"),)
    with pytest.raises(VMError, match="virtiofs share cannot be restored"):
        command_line(config(shares=shares), "tcg", restoring=True)


def test_a_virtiofs_vm_has_no_template_identity() -> None:
    from harpoon.vmm.qemu_launch import template_identity

    shares = (Share("data", Path("/d"), fs="virtiofs"),)
    assert template_identity(config(shares=shares)) is None


def test_virtiofsd_serves_the_inherited_socket_chrooted_and_uncached() -> None:
    from harpoon.vmm import virtiofsd

    argv = virtiofsd.command_line("/t/virtiofsd", Share("data", Path("/d"), read_only=True), 7)
    assert argv == [
        "/t/virtiofsd",
        "--fd=7",
        "--shared-dir=/d",
        "--sandbox=chroot",
        "--cache=never",
        "--announce-submounts",
        "--log-level=warn",
        "--readonly",
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Disk("Bad Id", Path("/x")),
        lambda: Disk("x" * 21, Path("/x")),
        lambda: NIC("eth0", "02:00:00:00:01", TapBackend("t")),
        lambda: NIC("eth0", "01:00:00:00:00:01", TapBackend("t")),
        lambda: Vsock(2),
        lambda: config(disks=(Disk("a", Path("/1")), Disk("a", Path("/2")))),
    ],
)
def test_a_device_no_backend_could_build_is_refused_where_it_is_described(make: object) -> None:
    with pytest.raises(DeviceError):
        make()  # type: ignore[operator]


def test_more_devices_than_microvm_has_transports_is_a_clear_error() -> None:
    # The virtio-serial device and the rootfs share, then one transport per disk.
    disks = tuple(Disk(f"layer{i}", Path(f"/l{i}.erofs")) for i in range(23))
    with pytest.raises(VMError, match=r"needs 25 virtio devices \(23 disks.*microvm has 24"):
        command_line(config(disks=disks, machine="microvm"), "tcg")
    command_line(config(disks=disks[:22]), "tcg")


def test_a_vm_with_more_devices_than_microvm_takes_moves_to_q35_eight_to_a_slot() -> None:
    from harpoon.vmm.qemu_launch import with_room_for_devices

    disks = tuple(Disk(f"layer{i}", Path(f"/l{i}.erofs")) for i in range(100))
    assert with_room_for_devices(config(disks=disks[:22])).machine is None
    roomy = with_room_for_devices(config(disks=disks))
    assert roomy.machine == "q35"
    devices = [a for a in command_line(roomy, "tcg") if a.startswith(("virtio-", "vhost-"))]
    addresses = [d.split("addr=")[1] for d in devices]
    # virtio-serial, the share, 100 disks: 102 functions, slot 2 upwards, 8 to a slot.
    assert addresses[0] == "0x2.0,multifunction=on" and addresses[1] == "0x2.1"
    assert addresses[-1] == "0xe.5"
    assert len(set(addresses)) == len(devices) == 102
