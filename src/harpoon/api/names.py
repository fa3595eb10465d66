"""Names both ends of the agent channel agree on (no logic)."""

AGENT_PORT_NAME = "harpoon.agent"
"""The agent channel's virtio-serial port name, as /sys/class/virtio-ports/*/name shows it."""

STDIO_PORT_NAME = "harpoon.stdio"
"""The second port, for process output and input only: a stdout nobody drains stalls
that port, never the control calls (Kill, Wait, Delete) on the agent port."""

AGENT_SERVICE = "harpoon.agent.v1.Agent"
