"""Names both ends of the agent channel agree on (no logic)."""

AGENT_PORT_NAME = "harpoon.agent"
"""The agent channel's virtio-serial port name, as /sys/class/virtio-ports/*/name shows it."""

STDIO_PORT_NAME = "harpoon.stdio"
"""The second port, for process output and input only: a stdout nobody drains stalls
that port, never the control calls (Kill, Wait, Delete) on the agent port."""

AGENT_SERVICE = "harpoon.agent.v1.Agent"

CONTAINER_CGROUPS_PATH = "/container"
"""The container's cgroup in the guest, as an OCI linux.cgroupsPath: the host's guest spec
names it (harpoon.shim.transform.guest_runtime), the agent reads stats from it and kills
what is left in it when the init exits (harpoon.agent.cgroups)."""
