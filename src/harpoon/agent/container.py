"""The container's OCI documents as the host sends them, parsed once into typed objects:
a `Container` from the init's whole spec (config.json as it must run in the guest), an
`OciProcess` from an exec's process (as `crun exec --process` reads it).

The rest of the agent reads these objects, never the JSON again. They keep the parsed
documents whole (`Container.config`, `OciProcess.document`): crun, not the agent,
implements what the agent does not read itself.

Plain slotted classes rather than dataclasses: importing `dataclasses` (and `inspect`
with it) and generating the classes' methods would cost the guest agent's start tens
of ms under TCG.
"""

from __future__ import annotations

import json
from typing import Any

from harpoon.errdefs import InvalidArgument


class OciProcess:
    """An OCI process: what the agent reads of it to check that its executable exists
    (as runc does before crun can), and the document crun runs."""

    __slots__ = ("args", "cwd", "document", "env")

    def __init__(self, args: list[str], env: list[str], cwd: str, document: dict[str, Any]) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.document = document

    def __repr__(self) -> str:
        return f"OciProcess(args={self.args!r}, cwd={self.cwd!r})"

    @classmethod
    def parse(cls, oci_json: bytes) -> OciProcess:
        """An exec's process, from its JSON."""
        return cls.from_document(_json_object(oci_json, "the exec's OCI process"))

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> OciProcess:
        args, env = document.get("args") or [], document.get("env") or []
        if not _strings(args) or not _strings(env):
            raise InvalidArgument("the OCI process's args and env must be lists of strings")
        cwd = document.get("cwd") or "/"
        if not isinstance(cwd, str):
            raise InvalidArgument(f"the OCI process's cwd must be a string: {cwd!r}")
        return cls(list(args), list(env), cwd, document)


class Container:
    """A container's spec (its init's config.json, adapted to the guest by the host)."""

    __slots__ = ("config", "poststart_hooks", "process", "root")

    def __init__(
        self, config: dict[str, Any], root: str, process: OciProcess, poststart_hooks: bool
    ) -> None:
        self.config = config
        # root.path: the container's root directory as the guest sees it.
        self.root = root
        self.process = process
        # crun itself must then run `start` (harpoon.agent.oci._start_created).
        self.poststart_hooks = poststart_hooks

    def __repr__(self) -> str:
        return f"Container(root={self.root!r}, process={self.process!r})"

    def bind_destinations(self) -> tuple[str, ...]:
        """Where the spec binds something into the container (a host file through the
        share, for one): paths that exist only once crun has mounted them."""
        found = []
        for mount in self.config.get("mounts") or []:
            if not isinstance(mount, dict):
                continue
            options = mount.get("options") or []
            bind = mount.get("type") in ("bind", "rbind") or any(
                o in ("bind", "rbind") for o in options if isinstance(o, str)
            )
            destination = mount.get("destination")
            if bind and isinstance(destination, str) and destination.startswith("/"):
                found.append(destination)
        return tuple(found)

    @classmethod
    def parse(cls, oci_json: bytes) -> Container:
        """A container's init, from the whole spec's JSON."""
        return cls.from_config(_json_object(oci_json, "the container's OCI spec"))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Container:
        root_spec = config.get("root") or {}
        if not isinstance(root_spec, dict):
            raise InvalidArgument("the container's OCI spec has a root that is not an object")
        root = root_spec.get("path", "")
        if not isinstance(root, str) or not root.startswith("/"):
            raise InvalidArgument(
                f"the container's root.path must be absolute in the guest: {root!r}"
            )
        process = config.get("process") or {}
        if not isinstance(process, dict):
            raise InvalidArgument("the container's OCI spec has a process that is not an object")
        hooks = config.get("hooks") or {}
        return cls(
            config,
            root,
            OciProcess.from_document(process),
            bool(isinstance(hooks, dict) and hooks.get("poststart")),
        )


def _json_object(oci_json: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(oci_json)
    except ValueError as error:
        raise InvalidArgument(f"{what} is not JSON: {error}") from None
    except RecursionError:
        # json's parser recurses per level: a document nested deeper than the
        # interpreter's stack is no OCI document (they nest a few levels).
        raise InvalidArgument(f"{what} is nested too deeply to be read as JSON") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return document


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
