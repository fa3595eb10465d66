"""A port published on the host, as `-p` asks for one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedPort:
    """host_address:host_port on the host, forwarded to container_port in the guest."""

    protocol: str
    host_address: str
    host_port: int
    container_port: int

    def __str__(self) -> str:
        return f"{self.host_address}:{self.host_port}:{self.container_port}/{self.protocol}"
