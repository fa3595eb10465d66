"""harpoon: a containerd runtime shim that runs every container in its own Linux VM."""

__version__ = "0.1.0"
