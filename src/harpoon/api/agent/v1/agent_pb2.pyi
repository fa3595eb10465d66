import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from harpoon.api.containerd.cgroups.v2 import metrics_pb2 as _metrics_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STDOUT: _ClassVar[Stream]
    STDERR: _ClassVar[Stream]
STDOUT: Stream
STDERR: Stream

class HelloRequest(_message.Message):
    __slots__ = ("host_time", "entropy", "warm_up")
    HOST_TIME_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    WARM_UP_FIELD_NUMBER: _ClassVar[int]
    host_time: _timestamp_pb2.Timestamp
    entropy: bytes
    warm_up: bool
    def __init__(self, host_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., entropy: _Optional[bytes] = ..., warm_up: _Optional[bool] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("agent_version", "kernel_release", "agent_uptime_s")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    AGENT_UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    kernel_release: str
    agent_uptime_s: float
    def __init__(self, agent_version: _Optional[str] = ..., kernel_release: _Optional[str] = ..., agent_uptime_s: _Optional[float] = ...) -> None: ...

class MountRequest(_message.Message):
    __slots__ = ("source", "target", "fstype", "options")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    fstype: str
    options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ...) -> None: ...

class UnmountRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class CreateProcessRequest(_message.Message):
    __slots__ = ("id", "terminal", "stdin", "hostname", "stdout", "stderr", "container_init", "oci_json", "container_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_INIT_FIELD_NUMBER: _ClassVar[int]
    OCI_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    terminal: bool
    stdin: bool
    hostname: str
    stdout: bool
    stderr: bool
    container_init: bool
    oci_json: bytes
    container_id: str
    def __init__(self, id: _Optional[str] = ..., terminal: _Optional[bool] = ..., stdin: _Optional[bool] = ..., hostname: _Optional[str] = ..., stdout: _Optional[bool] = ..., stderr: _Optional[bool] = ..., container_init: _Optional[bool] = ..., oci_json: _Optional[bytes] = ..., container_id: _Optional[str] = ...) -> None: ...

class StartProcessRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StartProcessResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class WaitProcessRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WaitProcessResponse(_message.Message):
    __slots__ = ("exit_status", "exited_at", "oom_killed")
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    exit_status: int
    exited_at: _timestamp_pb2.Timestamp
    oom_killed: bool
    def __init__(self, exit_status: _Optional[int] = ..., exited_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., oom_killed: _Optional[bool] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("id", "signal", "all")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    id: str
    signal: int
    all: bool
    def __init__(self, id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class DeleteProcessRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ReadOutputRequest(_message.Message):
    __slots__ = ("id", "stream")
    ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    id: str
    stream: Stream
    def __init__(self, id: _Optional[str] = ..., stream: _Optional[_Union[Stream, str]] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class StdinChunk(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class CloseStdinRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UpdateResourcesRequest(_message.Message):
    __slots__ = ("memory_limit_bytes", "cpu_quota_us", "cpu_period_us", "pids_limit")
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_QUOTA_US_FIELD_NUMBER: _ClassVar[int]
    CPU_PERIOD_US_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    memory_limit_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    pids_limit: int
    def __init__(self, memory_limit_bytes: _Optional[int] = ..., cpu_quota_us: _Optional[int] = ..., cpu_period_us: _Optional[int] = ..., pids_limit: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("metrics",)
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: _metrics_pb2.Metrics
    def __init__(self, metrics: _Optional[_Union[_metrics_pb2.Metrics, _Mapping]] = ...) -> None: ...

class ResizeTerminalRequest(_message.Message):
    __slots__ = ("id", "width", "height")
    ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    width: int
    height: int
    def __init__(self, id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class WaitDeviceRequest(_message.Message):
    __slots__ = ("kind", "id", "timeout_ms")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[WaitDeviceRequest.Kind]
        BLOCK: _ClassVar[WaitDeviceRequest.Kind]
        VIRTIO_PORT: _ClassVar[WaitDeviceRequest.Kind]
        NIC: _ClassVar[WaitDeviceRequest.Kind]
    KIND_UNSPECIFIED: WaitDeviceRequest.Kind
    BLOCK: WaitDeviceRequest.Kind
    VIRTIO_PORT: WaitDeviceRequest.Kind
    NIC: WaitDeviceRequest.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    kind: WaitDeviceRequest.Kind
    id: str
    timeout_ms: int
    def __init__(self, kind: _Optional[_Union[WaitDeviceRequest.Kind, str]] = ..., id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class WaitDeviceResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ConfigureNetworkRequest(_message.Message):
    __slots__ = ("process_id", "device_mac", "interface", "routes", "host_loopback", "host_ports", "block_tcp")
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MAC_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    HOST_LOOPBACK_FIELD_NUMBER: _ClassVar[int]
    HOST_PORTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TCP_FIELD_NUMBER: _ClassVar[int]
    process_id: str
    device_mac: str
    interface: NetworkInterface
    routes: _containers.RepeatedCompositeFieldContainer[NetworkRoute]
    host_loopback: str
    host_ports: _containers.RepeatedCompositeFieldContainer[ListeningPort]
    block_tcp: str
    def __init__(self, process_id: _Optional[str] = ..., device_mac: _Optional[str] = ..., interface: _Optional[_Union[NetworkInterface, _Mapping]] = ..., routes: _Optional[_Iterable[_Union[NetworkRoute, _Mapping]]] = ..., host_loopback: _Optional[str] = ..., host_ports: _Optional[_Iterable[_Union[ListeningPort, _Mapping]]] = ..., block_tcp: _Optional[str] = ...) -> None: ...

class SetHostPortsRequest(_message.Message):
    __slots__ = ("ports",)
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ports: _containers.RepeatedCompositeFieldContainer[ListeningPort]
    def __init__(self, ports: _Optional[_Iterable[_Union[ListeningPort, _Mapping]]] = ...) -> None: ...

class NetworkInterface(_message.Message):
    __slots__ = ("name", "mac", "mtu", "addresses")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    mac: str
    mtu: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., mac: _Optional[str] = ..., mtu: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class NetworkRoute(_message.Message):
    __slots__ = ("destination", "gateway")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    destination: str
    gateway: str
    def __init__(self, destination: _Optional[str] = ..., gateway: _Optional[str] = ...) -> None: ...

class ListeningPort(_message.Message):
    __slots__ = ("protocol", "port")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    port: int
    def __init__(self, protocol: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class ListeningPortsResponse(_message.Message):
    __slots__ = ("ports",)
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ports: _containers.RepeatedCompositeFieldContainer[ListeningPort]
    def __init__(self, ports: _Optional[_Iterable[_Union[ListeningPort, _Mapping]]] = ...) -> None: ...

class GuestProcess(_message.Message):
    __slots__ = ("pid", "ppid", "uid", "user", "start_ticks", "cpu_ticks", "tty_nr", "args", "comm")
    PID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    START_TICKS_FIELD_NUMBER: _ClassVar[int]
    CPU_TICKS_FIELD_NUMBER: _ClassVar[int]
    TTY_NR_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    pid: int
    ppid: int
    uid: int
    user: str
    start_ticks: int
    cpu_ticks: int
    tty_nr: int
    args: _containers.RepeatedScalarFieldContainer[str]
    comm: str
    def __init__(self, pid: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., user: _Optional[str] = ..., start_ticks: _Optional[int] = ..., cpu_ticks: _Optional[int] = ..., tty_nr: _Optional[int] = ..., args: _Optional[_Iterable[str]] = ..., comm: _Optional[str] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes", "uptime_ticks", "ticks_per_second")
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_TICKS_FIELD_NUMBER: _ClassVar[int]
    TICKS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[GuestProcess]
    uptime_ticks: int
    ticks_per_second: int
    def __init__(self, processes: _Optional[_Iterable[_Union[GuestProcess, _Mapping]]] = ..., uptime_ticks: _Optional[int] = ..., ticks_per_second: _Optional[int] = ...) -> None: ...
