"""The vfkit double's command line: what real vfkit accepts it parses the same way, what
vfkit refuses it refuses with vfkit's words, what the double does not run it names."""

from __future__ import annotations

import pytest

from harpoon.devenv.vfkit_double import cmdline, devices
from harpoon.devenv.vfkit_double.cmdline import CommandLineError, Options, RestfulURI

KERNEL = "/k/vmlinux"
INITRD = "/k/initrd.cpio"
BOOT = f'linux,kernel={KERNEL},initrd={INITRD},cmdline="console=hvc0 quiet, panic=-1"'


def parse(*argv: str) -> Options:
    command = cmdline.parse(list(argv))
    assert isinstance(command, Options)
    return command


def refused(*argv: str) -> str:
    with pytest.raises(CommandLineError) as caught:
        cmdline.parse(list(argv))
    return str(caught.value)


def test_the_line_harpoons_backend_runs_is_parsed_into_typed_devices() -> None:
    options = parse(
        "--cpus", "2", "--memory", "768",
        "--bootloader", BOOT,
        "--device", "virtio-serial,logFilePath=/s/console.log",
        "--device", "virtio-vsock,port=1025,socketURL=/s/agent.sock,connect",
        "--device", "virtio-vsock,port=1026,socketURL=/s/stdio.sock,connect",
        "--device", "virtio-fs,sharedDir=/data/rootfs,mountTag=rootfs",
        "--device", "virtio-blk,path=/s/layer0.erofs,deviceId=layer0",
        "--device", "virtio-net,unixSocketPath=/s/net.sock,mac=5A:94:EF:E4:0C:EE",
        "--restful-uri", "unix:///s/vfkit-rest.sock",
        "--pidfile", "/s/vmm.pid",
    )  # fmt: skip

    assert options.cpus == 2 and options.memory_mib == 768
    # The quoted cmdline keeps its comma and loses its quotes (string_slice.go, TrimQuotes).
    assert options.bootloader == cmdline.LinuxBootloader(
        KERNEL, INITRD, "console=hvc0 quiet, panic=-1"
    )
    assert options.devices == (
        devices.VirtioSerial("/s/console.log"),
        devices.VirtioVsock(1025, "/s/agent.sock", listen=False),
        devices.VirtioVsock(1026, "/s/stdio.sock", listen=False),
        devices.VirtioFs("/data/rootfs", "rootfs"),
        devices.VirtioBlk("/s/layer0.erofs", "layer0"),
        devices.VirtioNet("/s/net.sock", mac="5a:94:ef:e4:0c:ee", vfkit_magic=True),
    )
    assert options.restful_uri == RestfulURI("unix", path="/s/vfkit-rest.sock")
    assert options.pidfile == "/s/vmm.pid"
    assert [port.port for port in options.vsock_ports()] == [1025, 1026]


def test_defaults_and_flag_spellings_are_pflags() -> None:
    options = parse("-b", BOOT)
    assert (options.cpus, options.memory_mib, options.restful_uri) == (1, 512, RestfulURI("none"))
    assert parse(f"--bootloader={BOOT}", "-c3", "-m=1024", "-d", "virtio-rng").cpus == 3
    assert parse("-b", BOOT, "-m=1024").memory_mib == 1024
    assert parse("-b", BOOT, "-d", "virtio-rng").devices == (devices.VirtioRng(),)
    # --bootloader is a slice: repeated values append.
    split = parse("--bootloader", "linux", "--bootloader", f"kernel={KERNEL},initrd={INITRD}")
    assert split.bootloader == cmdline.LinuxBootloader(KERNEL, INITRD, "")


def test_the_legacy_boot_flags_go_together_and_exclude_bootloader() -> None:
    legacy = parse("--kernel", KERNEL, "--initrd", INITRD, "--kernel-cmdline", "console=hvc0")
    assert legacy.bootloader == cmdline.LinuxBootloader(KERNEL, INITRD, "console=hvc0")
    assert refused("--kernel", KERNEL) == (
        "if any flags in the group [kernel initrd kernel-cmdline] are set they must all be "
        "set; missing [initrd kernel-cmdline]"
    )
    assert refused("-k", KERNEL, "-i", INITRD, "-C", "x", "--bootloader", BOOT) == (
        "if any flags in the group [kernel bootloader] are set none of the others can be; "
        "[bootloader kernel] were all set"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "empty option list in --bootloader command line argument"),
        (("--bootloader", "grub"), "unknown bootloader type: grub"),
        (
            ("--bootloader", "linux,kernel=/k,root=/dev/vda"),
            "unknown option for Linux bootloaders: root",
        ),
        (
            ("--bootloader", 'linux,cmdline="open'),
            'invalid argument "linux,cmdline=\\"open" for "-b, --bootloader" flag: mismatched "',
        ),
        (("--frobnicate",), "unknown flag: --frobnicate"),
        (("-x",), "unknown shorthand flag: 'x' in -x"),
        (("--cpus",), "flag needs an argument: --cpus"),
        (
            ("--cpus", "-1"),
            'invalid argument "-1" for "-c, --cpus" flag: '
            'strconv.ParseUint: parsing "-1": invalid syntax',
        ),
        (("-b", BOOT, "--log-level", "trace"), "unknown log level: trace"),
    ],
)
def test_a_line_vfkit_refuses_is_refused_with_its_message(
    argv: tuple[str, ...], message: str
) -> None:
    assert refused(*argv) == message


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("virtio-foo", "unknown device type: virtio-foo"),
        (
            "virtio-fs,sharedDir=/d,mountTag=t,readonly",
            "unknown option for virtio-fs devices: readonly",
        ),
        ("virtio-fs,mountTag=t", "missing mandatory 'sharedDir' option for virtio-fs device"),
        ("virtio-blk,path=/d,cache=none", "unknown option for virtio-blk devices: cache"),
        ("virtio-blk,path=/d,type=qcow2", "unexpected value for disk 'type' option: qcow2"),
        ("virtio-vsock,port=x,socketURL=/s", 'strconv.ParseUint: parsing "x": invalid syntax'),
        (
            "virtio-vsock,port=4294967296",
            'strconv.ParseUint: parsing "4294967296": value out of range',
        ),
        ("virtio-vsock,port=1,socketURL=/s,cid=3", "unknown option for virtio-vsock devices: cid"),
        ("virtio-serial", "one of 'logFilePath', 'stdio' or 'pty' must be set"),
        (
            "virtio-serial,logFilePath=/l,stdio",
            "'logFilePath' and 'stdio' cannot be set at the same time",
        ),
        ("virtio-net", "one of 'nat' or 'fd' or 'unixSocketPath' must be set"),
        (
            "virtio-net,nat,unixSocketPath=/n",
            "'nat' and 'unixSocketPath' cannot be set at the same time",
        ),
        ("virtio-net,path=/n", "'path' option requires 'type' to be specified"),
        (
            "virtio-net,type=unixstream,path=/n",
            "unsupported virtio-net type: unixstream (only 'unixgram' is supported)",
        ),
        ("virtio-net,unixSocketPath=/n,mac=zz", "address zz: invalid MAC address"),
        ("virtio-rng,fast", "unknown options for virtio-rng devices: [{fast }]"),
    ],
)
def test_a_device_vfkit_refuses_is_refused_with_its_message(device: str, message: str) -> None:
    assert refused("-b", BOOT, "--device", device) == message


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("localhost:8081", "invalid scheme localhost"),
        ("ftp://x", "invalid scheme ftp"),
        ("tcp://localhost", "invalid TCP uri: missing port"),
        ("tcp://localhost:80/x", "invalid TCP uri: path is forbidden"),
        ("unix://host/x.sock", "invalid unix uri: host is forbidden"),
        ("unix:///" + "s" * 103, "invalid unix uri: socket path length exceeds macOS limits"),
    ],
)
def test_a_rest_uri_vfkit_refuses_is_refused_with_its_message(uri: str, message: str) -> None:
    assert refused("-b", BOOT, "--restful-uri", uri) == message


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--gui",), "--gui"),
        (("--nested",), "--nested"),
        (("--timesync", "vsockPort=1234"), "--timesync"),
        (("--cloud-init", "/u/user-data"), "--cloud-init"),
        (("--device", "virtio-net,nat"), "virtio-net,nat"),
        (("--device", "virtio-serial,pty"), "virtio-serial,pty"),
        (("--device", "virtio-blk,path=/dev/sda,type=dev"), "type=dev"),
        (("--device", "rosetta,mountTag=r"), "rosetta"),
        (("--device", "virtio-gpu"), "virtio-gpu"),
    ],
)
def test_what_the_double_does_not_run_is_refused_by_name(argv: tuple[str, ...], named: str) -> None:
    message = refused("-b", BOOT, *argv)
    assert named in message and "test double" in message
    # EFI boot is real vfkit's too.
    assert "test double" in refused("--bootloader", "efi,variable-store=/v,create")


def test_vsock_listen_is_the_default_and_connect_the_other_way() -> None:
    found = parse(
        "-b", BOOT,
        "--device", "virtio-vsock,port=5,socketURL=/s/five.sock",
        "--device", "virtio-vsock,socketURL=/s/six.sock,port=6,connect",
        "--device", "virtio-vsock,port=7",  # no socket: a device, no exposed port
    ).devices  # fmt: skip
    assert found == (
        devices.VirtioVsock(5, "/s/five.sock", listen=True),
        devices.VirtioVsock(6, "/s/six.sock", listen=False),
        devices.VirtioVsock(7, "", listen=True),
    )


def test_device_options_split_on_every_comma_and_skip_empty_items() -> None:
    """deviceFromCmdLine has no quoting (unlike --bootloader), and skips empty options."""
    assert parse("-b", BOOT, "-d", "virtio-blk,path=/d/img,,readonly,").devices == (
        devices.VirtioBlk("/d/img", read_only=True),
    )
    assert refused("-b", BOOT, "-d", 'virtio-blk,path="/a,b"') == (
        'unknown option for virtio-blk devices: b"'
    )


def test_virtio_net_backends_and_the_vfkit_magic() -> None:
    new_syntax = parse("-b", BOOT, "-d", "virtio-net,type=unixgram,path=/n.sock,vfkitMagic=off")
    inherited = parse("-b", BOOT, "-d", "virtio-net,fd=4,mac=00-11-22-33-44-55")
    assert new_syntax.devices == (devices.VirtioNet("/n.sock", vfkit_magic=False),)
    assert inherited.devices == (devices.VirtioNet(fd=4, mac="00:11:22:33:44:55"),)


def test_help_and_version_win_over_everything_else() -> None:
    assert isinstance(cmdline.parse(["--cpus", "2", "-h"]), cmdline.ShowHelp)
    assert isinstance(cmdline.parse(["--version", "--kernel", KERNEL]), cmdline.ShowVersion)


def test_restful_uris() -> None:
    assert cmdline.parse_restful_uri("tcp://localhost:8081") == RestfulURI("tcp", "localhost:8081")
    assert cmdline.parse_restful_uri("http://127.0.0.1:9") == RestfulURI("tcp", "127.0.0.1:9")
    assert cmdline.parse_restful_uri("none://") == RestfulURI("none")
    assert cmdline.parse_restful_uri("tcp://[::1]:7").hostname == "::1"


def test_virtio_fs_without_a_tag_is_tagged_by_the_directorys_name() -> None:
    assert devices.VirtioFs("/data/rootfs/", "").tag == "rootfs"
    assert devices.VirtioFs("/data/rootfs", "t").tag == "t"


def test_inspect_shows_devices_as_vfkit_json_does() -> None:
    shown = [
        devices.inspect_json(device)
        for device in (
            devices.VirtioSerial("/l"),
            devices.VirtioVsock(3, "/v", listen=True),
            devices.VirtioVsock(4, "/w", listen=False),
            devices.VirtioFs("/d", "t"),
            devices.VirtioBlk("/i", "id0"),
            devices.VirtioNet("/n", mac="00:11:22:33:44:55", vfkit_magic=True),
            devices.VirtioRng(),
        )
    ]
    assert shown == [
        {"kind": "virtioserial", "logFile": "/l"},
        {"kind": "virtiosock", "port": 3, "socketURL": "/v", "listen": True},
        {"kind": "virtiosock", "port": 4, "socketURL": "/w"},
        {"kind": "virtiofs", "mountTag": "t", "sharedDir": "/d"},
        {"kind": "virtioblk", "devName": "virtio-blk", "imagePath": "/i",
         "deviceIdentifier": "id0"},
        {"kind": "virtionet", "nat": False, "socket": {}, "vfkitMagic": True,
         "macAddress": "00:11:22:33:44:55"},
        {"kind": "virtiorng"},
    ]  # fmt: skip
