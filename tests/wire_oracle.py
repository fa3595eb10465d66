"""The generated protobuf classes as the oracle of the shim's hand-written bootstrap
reader (harpoon.shim.bootstrap): what they read, in the reader's own types. Shared by
tests/unit/test_shim_wire.py and the shim_start fuzz target."""

from __future__ import annotations

from harpoon.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from harpoon.shim.bootstrap import AnyMessage, BootstrapParams


def params_read_by_protobuf(message: bootstrap_pb2.BootstrapParams) -> BootstrapParams:
    return BootstrapParams(
        instance_id=message.instance_id,
        namespace=message.namespace,
        log_level=message.log_level,
        containerd_version=message.containerd_version,
        containerd_ttrpc_address=message.containerd_ttrpc_address,
        containerd_grpc_address=message.containerd_grpc_address,
        containerd_binary=message.containerd_binary,
        extensions=tuple(AnyMessage(e.value.type_url, e.value.value) for e in message.extensions),
        socket_dir=message.socket_dir if message.HasField("socket_dir") else None,
    )
