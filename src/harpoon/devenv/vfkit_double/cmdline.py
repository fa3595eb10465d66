"""vfkit's command line, parsed into `Options` (sans-IO: no file is opened here).

vfkit is a cobra command with pflag flags (vfkit pkg/cmdline/cmdline.go): `--name value`,
`--name=value`, `-n value`, `-nvalue`; `--device` may repeat (a StringArray, each value
kept whole); `--bootloader` is vfkit's own string slice whose values split on commas
outside double quotes (pkg/cmdline/string_slice.go), so `cmdline="a b,c"` stays one
item. Cobra's flag groups apply: the legacy `--kernel/--initrd/--kernel-cmdline` go
together and exclude `--bootloader`. Errors carry the words pflag, cobra and vfkit use.

What real vfkit accepts but the double does not run (the GUI, nested virtualization,
timesync, ignition, cloud-init, EFI or macOS boot, some devices) is refused with
`CommandLineError` naming it, never ignored: a test passing on the double must mean
the same command line works on a Mac.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from harpoon.devenv.vfkit_double import devices
from harpoon.devenv.vfkit_double.devices import Device, VirtioVsock

#: What `vfkit --version` says (cmd/vfkit/root.go's template: "vfkit version: ...").
VERSION = "v0.6.4-harpoon-double"
#: macOS's sockaddr_un holds 104 bytes with the NUL: vfkit pkg/rest/rest.go maxSocketPathLen.
MAX_UNIX_PATH_BYTES = 103

FlagKind = Literal["uint", "string", "array", "slice", "bool"]


class CommandLineError(ValueError):
    """A command line vfkit refuses (or the double does not run); the message is vfkit's."""


@dataclass(frozen=True)
class Flag:
    name: str
    short: str
    kind: FlagKind
    #: Real vfkit's, but not run by the double: refused when given.
    unsupported: bool = False

    @property
    def shown(self) -> str:
        """How pflag names the flag in errors: `-c, --cpus` or `--memory`."""
        return f"-{self.short}, --{self.name}" if self.short else f"--{self.name}"


# pkg/cmdline/cmdline.go AddFlags, plus cobra's own help and version flags.
FLAGS = (
    Flag("kernel", "k", "string"),
    Flag("kernel-cmdline", "C", "string"),
    Flag("initrd", "i", "string"),
    Flag("bootloader", "b", "slice"),
    Flag("gui", "", "bool", unsupported=True),
    Flag("cpus", "c", "uint"),
    Flag("memory", "m", "uint"),
    Flag("timesync", "t", "string", unsupported=True),
    Flag("device", "d", "array"),
    Flag("log-level", "", "string"),
    Flag("restful-uri", "", "string"),
    Flag("ignition", "", "string", unsupported=True),
    Flag("cloud-init", "", "slice", unsupported=True),
    Flag("nested", "n", "bool", unsupported=True),
    Flag("pidfile", "", "string"),
    Flag("help", "h", "bool"),
    Flag("version", "v", "bool"),
)
BY_NAME = {flag.name: flag for flag in FLAGS}
BY_SHORT = {flag.short: flag for flag in FLAGS if flag.short}
LEGACY_BOOT_FLAGS = ("kernel", "initrd", "kernel-cmdline")
LOG_LEVELS = ("error", "debug", "info")
#: A URI's scheme as Go's net/url reads it (getScheme).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")

USAGE = """\
vfkit is a simple hypervisor using Apple's Virtualization framework
(here: harpoon's test double, backed by QEMU)

Usage:
  vfkit [flags]

Flags:
  -b, --bootloader stringSlice   bootloader configuration
  -c, --cpus uint                number of virtual CPUs (default 1)
  -d, --device stringArray       devices
  -h, --help                     help for vfkit
  -i, --initrd string            path to the virtual machine initrd
  -k, --kernel string            path to the virtual machine Linux kernel
  -C, --kernel-cmdline string    Linux kernel command line
      --log-level string         set log level
  -m, --memory uint              virtual machine RAM size in mibibytes (default 512)
      --pidfile string           path to the pid file
      --restful-uri string       URI address for RESTful services (default "none://")
  -v, --version                  version for vfkit
"""


@dataclass(frozen=True)
class LinuxBootloader:
    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class RestfulURI:
    """Where the REST API listens: nowhere (`none`), a unix socket path, or host:port."""

    scheme: Literal["none", "unix", "tcp"]
    host: str = ""
    path: str = ""

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def hostname(self) -> str:
        return self.host.rsplit(":", 1)[0].strip("[]")


@dataclass(frozen=True)
class Options:
    """A VM as vfkit's command line describes it."""

    bootloader: LinuxBootloader
    cpus: int = 1
    memory_mib: int = 512
    devices: tuple[Device, ...] = ()
    restful_uri: RestfulURI = RestfulURI("none")
    pidfile: str = ""
    log_level: str = ""

    def vsock_ports(self) -> list[VirtioVsock]:
        """The vsock ports with a host socket (vfkit skips those without one)."""
        return [d for d in self.devices if isinstance(d, VirtioVsock) and d.socket_url]


@dataclass(frozen=True)
class ShowHelp:
    pass


@dataclass(frozen=True)
class ShowVersion:
    pass


Command = Options | ShowHelp | ShowVersion


@dataclass
class _Parsed:
    """Flag values as pflag collects them: the last value wins, arrays append."""

    values: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)
    positional: list[str] = field(default_factory=list)

    def set(self, flag: Flag, value: str) -> None:
        if flag.kind == "bool":
            if value not in _TRUE + _FALSE:
                raise _invalid(flag, value, f'strconv.ParseBool: parsing "{value}": invalid syntax')
            self.values[flag.name] = "true" if value in _TRUE else "false"
        elif flag.kind == "uint":
            if not (value.isascii() and value.isdigit()):
                raise _invalid(flag, value, f'strconv.ParseUint: parsing "{value}": invalid syntax')
            self.values[flag.name] = value
        elif flag.kind == "array":
            self.lists.setdefault(flag.name, []).append(value)
        elif flag.kind == "slice":
            try:
                self.lists.setdefault(flag.name, []).extend(split_quoted(value))
            except ValueError as error:
                raise _invalid(flag, value, str(error)) from None
        else:
            self.values[flag.name] = value

    def given(self, name: str) -> bool:
        return name in self.values or name in self.lists

    def flag(self, name: str) -> bool:
        return self.values.get(name) == "true"


def _invalid(flag: Flag, value: str, why: str) -> CommandLineError:
    # pflag: fmt.Errorf("invalid argument %q for %q flag: %v"); JSON quotes as Go's %q
    # does for printable text.
    quoted, name = json.dumps(value, ensure_ascii=False), json.dumps(flag.shown)
    return CommandLineError(f"invalid argument {quoted} for {name} flag: {why}")


def split_quoted(value: str) -> list[str]:
    """vfkit's stringSliceValue.Set: split on commas outside double quotes, keeping the
    quotes (an item wholly in quotes loses them: util.TrimQuotes)."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append(_trim_quotes("".join(current)))
            current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError('mismatched "')
    last = _trim_quotes("".join(current))
    if items or last:
        items.append(last)
    return items


def _trim_quotes(text: str) -> str:
    # vfkit pkg/util/strings.go TrimQuotes: both ends quoted, then strings.Trim: every
    # leading and trailing quote goes.
    if len(text) >= 1 and text.startswith('"') and text.endswith('"'):
        return text.strip('"')
    return text


def _scan(argv: Sequence[str]) -> _Parsed:
    """pflag's parse of argv (flags anywhere, `--` ends them)."""
    parsed = _Parsed()
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            parsed.positional += argv[index:]
            break
        if arg.startswith("--"):
            index = _long(parsed, arg, argv, index)
        elif arg.startswith("-") and len(arg) > 1:
            index = _shorts(parsed, arg, argv, index)
        else:
            parsed.positional.append(arg)
    return parsed


def _long(parsed: _Parsed, arg: str, argv: Sequence[str], index: int) -> int:
    name, equals, value = arg[2:].partition("=")
    flag = BY_NAME.get(name)
    if flag is None:
        raise CommandLineError(f"unknown flag: --{name}")
    if flag.kind == "bool":
        parsed.set(flag, value if equals else "true")
        return index
    if not equals:
        if index >= len(argv):
            raise CommandLineError(f"flag needs an argument: --{name}")
        value, index = argv[index], index + 1
    parsed.set(flag, value)
    return index


def _shorts(parsed: _Parsed, arg: str, argv: Sequence[str], index: int) -> int:
    letters = arg[1:]
    while letters:
        letter, letters = letters[0], letters[1:]
        flag = BY_SHORT.get(letter)
        if flag is None:
            raise CommandLineError(f"unknown shorthand flag: '{letter}' in {arg}")
        if flag.kind == "bool":
            parsed.set(flag, "true")
            continue
        if letters:
            value = letters.removeprefix("=")
        elif index < len(argv):
            value, index = argv[index], index + 1
        else:
            raise CommandLineError(f"flag needs an argument: '{letter}' in {arg}")
        parsed.set(flag, value)
        break
    return index


def _check_groups(parsed: _Parsed) -> None:
    """Cobra's flag groups (cmdline.go): required together, then mutually exclusive."""
    legacy = [name for name in LEGACY_BOOT_FLAGS if parsed.given(name)]
    if legacy and len(legacy) < len(LEGACY_BOOT_FLAGS):
        missing = sorted(set(LEGACY_BOOT_FLAGS) - set(legacy))
        group = " ".join(LEGACY_BOOT_FLAGS)
        raise CommandLineError(
            f"if any flags in the group [{group}] are set they must all be set; "
            f"missing [{' '.join(missing)}]"
        )
    for name in LEGACY_BOOT_FLAGS:
        if parsed.given(name) and parsed.given("bootloader"):
            both = " ".join(sorted((name, "bootloader")))
            raise CommandLineError(
                f"if any flags in the group [{name} bootloader] are set none of the others "
                f"can be; [{both}] were all set"
            )


def parse(argv: Sequence[str]) -> Command:
    """vfkit's command line (without the program name) as a Command; CommandLineError
    with vfkit's message when vfkit would refuse it."""
    parsed = _scan(argv)
    if parsed.flag("help"):
        return ShowHelp()
    if parsed.flag("version"):
        return ShowVersion()
    _check_groups(parsed)
    for flag in FLAGS:
        set_ = parsed.flag(flag.name) if flag.kind == "bool" else parsed.given(flag.name)
        if flag.unsupported and set_:
            raise CommandLineError(
                f"--{flag.name} is real vfkit's but the vfkit test double does not run it"
            )
    log_level = parsed.values.get("log-level", "")
    if log_level and log_level not in LOG_LEVELS:
        raise CommandLineError(f"unknown log level: {log_level}")
    try:
        found = [devices.parse_device(spec) for spec in parsed.lists.get("device", [])]
    except devices.DeviceError as error:
        raise CommandLineError(str(error)) from None
    return Options(
        bootloader=_bootloader(parsed),
        cpus=int(parsed.values.get("cpus", "1")),
        memory_mib=int(parsed.values.get("memory", "512")),
        devices=tuple(found),
        restful_uri=parse_restful_uri(parsed.values.get("restful-uri", "none://")),
        pidfile=parsed.values.get("pidfile", ""),
        log_level=log_level,
    )


def _bootloader(parsed: _Parsed) -> LinuxBootloader:
    """cmd/vfkit/main.go newBootloaderConfiguration: the legacy flags if any, else
    --bootloader (pkg/config/bootloader.go BootloaderFromCmdLine)."""
    if any(parsed.given(name) for name in LEGACY_BOOT_FLAGS):
        return LinuxBootloader(
            parsed.values.get("kernel", ""),
            parsed.values.get("initrd", ""),
            parsed.values.get("kernel-cmdline", ""),
        )
    items = parsed.lists.get("bootloader", [])
    if not items:
        raise CommandLineError("empty option list in --bootloader command line argument")
    kind, options = items[0], items[1:]
    if kind in ("efi", "macos"):
        raise CommandLineError(
            f"--bootloader {kind} is real vfkit's but the vfkit test double boots linux only"
        )
    if kind != "linux":
        raise CommandLineError(f"unknown bootloader type: {kind}")
    kernel = initrd = cmdline = ""
    for item in options:
        if not item:
            continue
        key, _, value = item.partition("=")
        if key == "kernel":
            kernel = value
        elif key == "cmdline":
            cmdline = _trim_quotes(value)
        elif key == "initrd":
            initrd = value
        else:
            raise CommandLineError(f"unknown option for Linux bootloaders: {key}")
    return LinuxBootloader(kernel, initrd, cmdline)


def parse_restful_uri(text: str) -> RestfulURI:
    """vfkit pkg/rest/rest.go parseRestfulURI: Go's url.ParseRequestURI (a scheme, then
    `//authority/path`, a `/path`, or an opaque rest), then vfkit's checks."""
    found = _SCHEME.match(text)
    if found:
        scheme, rest = found.group(1).lower(), found.group(2)
    elif text.startswith("/"):
        scheme, rest = "", text
    else:
        raise CommandLineError(f'parse "{text}": invalid URI for request')
    if rest.startswith("//"):
        parts = urllib.parse.urlsplit(rest)
        host, path = parts.netloc, parts.path
    else:
        host, path = "", rest if rest.startswith("/") else ""
    if scheme in ("tcp", "http"):
        return _tcp_uri(host, path)
    if scheme == "unix":
        return _unix_uri(host, path)
    if scheme == "none":
        return RestfulURI("none")
    raise CommandLineError(f"invalid scheme {scheme}")


def _tcp_uri(host: str, path: str) -> RestfulURI:
    if not host:
        raise CommandLineError("invalid TCP uri: missing host")
    if path:
        raise CommandLineError("invalid TCP uri: path is forbidden")
    if ":" not in host or not host.rsplit(":", 1)[1].isdigit():
        raise CommandLineError("invalid TCP uri: missing port")
    return RestfulURI("tcp", host=host)


def _unix_uri(host: str, path: str) -> RestfulURI:
    if not path:
        raise CommandLineError("invalid unix uri: missing path")
    if host:
        raise CommandLineError("invalid unix uri: host is forbidden")
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        raise CommandLineError("invalid unix uri: socket path length exceeds macOS limits")
    return RestfulURI("unix", path=path)
