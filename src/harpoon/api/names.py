"""Names both ends of the agent channel agree on (no logic)."""

AGENT_PORT_NAME = "harpoon.agent"
"""The agent channel's virtio-serial port name, as /sys/class/virtio-ports/*/name shows it."""

AGENT_SERVICE = "harpoon.agent.v1.Agent"
