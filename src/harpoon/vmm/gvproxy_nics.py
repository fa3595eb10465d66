"""The gvproxy of a VM's NIC that asks for one (StreamBackend(gvproxy=True)), for any
backend: started by the VM's launch before the VMM (which attaches the NIC as it
starts), its files in the VM's state directory, ended with the VM. The NIC's protocol
is the backend's: QEMU's `-netdev stream` ("qemu") or vfkit's unixgram ("vfkit")
(harpoon.net.gvproxy). gvproxy's API socket is the same either way, so publishing
ports (harpoon.sandbox) never learns which VMM runs.

harpoon.net is imported when a VM has such a NIC, not before: a shim launches its VM
before it has loaded more than it needs for that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harpoon.vmm.base import VMConfig, VMError
from harpoon.vmm.devices import NIC, StreamBackend
from harpoon.vmm.process import VmmProcess

if TYPE_CHECKING:
    from harpoon.net.gvproxy import GvproxyConfig, NicProtocol


def gvproxy_config(state_dir: Path, nic: NIC, protocol: NicProtocol = "qemu") -> GvproxyConfig:
    """The gvproxy of a NIC whose backend asks for one: its files in the VM's state
    directory, the NIC's MAC as the guest's."""
    from harpoon.net.gvproxy import GvproxyConfig

    return GvproxyConfig(state_dir, guest_mac=nic.mac, nic_protocol=protocol)


def gvproxy_nics(config: VMConfig) -> list[NIC]:
    return [
        nic for nic in config.nics if isinstance(nic.backend, StreamBackend) and nic.backend.gvproxy
    ]


def start_gvproxies(config: VMConfig, protocol: NicProtocol) -> tuple[VmmProcess, ...]:
    """A gvproxy for each NIC that asks for one, listening (and answering on its API)
    when this returns; VMError naming the VM if one cannot be started."""
    nics = gvproxy_nics(config)
    if not nics:
        return ()
    from harpoon.net.gvproxy import start_gvproxy
    from harpoon.net.gvproxy_api import GvproxyError

    started: list[VmmProcess] = []
    try:
        for nic in nics:
            try:
                gvproxy = start_gvproxy(gvproxy_config(config.state_dir, nic, protocol))
                started.append(VmmProcess(gvproxy.process))
            except GvproxyError as error:
                raise VMError(f"VM {config.name}: {error}") from None
    except BaseException:
        for process in started:
            process.kill()
        raise
    return tuple(started)


def remove_gvproxy_files(config: VMConfig) -> None:
    """Removes what the VM's gvproxies left in its state directory (once they are gone)."""
    nics = gvproxy_nics(config)
    if not nics:
        return
    from harpoon.net.gvproxy import remove_files

    for nic in nics:
        remove_files(gvproxy_config(config.state_dir, nic))
