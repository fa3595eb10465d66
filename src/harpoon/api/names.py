"""Names both ends of the agent channel agree on (no logic)."""

AGENT_PORT_NAME = "harpoon.agent"
"""The agent channel's virtio-serial port name, as /sys/class/virtio-ports/*/name shows it."""

STDIO_PORT_NAME = "harpoon.stdio"
"""The second port, for process output and input only: a stdout nobody drains stalls
that port, never the control calls (Kill, Wait, Delete) on the agent port."""

AGENT_VSOCK_PORT = 1025
"""The agent channel's AF_VSOCK port, in a VM that has a virtio vsock device and no
virtio-serial ports (vfkit's): the agent listens on it, the host connects (through vfkit's
`virtio-vsock,connect` unix socket). Above 1024, which vfkit keeps for ignition; nerdbox
serves its ttrpc on 1025 and its streams on 1026 too."""

STDIO_VSOCK_PORT = 1026
"""The stdio channel's AF_VSOCK port (STDIO_PORT_NAME's counterpart)."""

AGENT_SERVICE = "harpoon.agent.v1.Agent"

CONTAINER_CGROUPS_PATH = "/container"
"""The container's cgroup in the guest, as an OCI linux.cgroupsPath: the host's guest spec
names it (harpoon.shim.transform.guest_runtime), the agent reads stats from it and kills
what is left in it when the init exits (harpoon.agent.cgroups)."""
