"""`harpoon compose …`: nerdctl compose with every service in a harpoon VM.

nerdctl compose creates each service's container by running nerdctl itself (its own
binary: os.Executable), with `--runtime` only for a service that names one (compose's
`runtime:`), else nerdctl's default, runc's; harpoon's `--runtime` on the command line
never reaches those runs. So harpoon first asks `nerdctl compose [GLOBAL FLAGS] config`
for the project as compose resolves it (the files found or named, `.env`, profiles,
relative paths made absolute, the project's `name:`), gives `runtime:
io.containerd.harpoon.v1` to each service that names no runtime (one that does keeps
its own: `runtime: io.containerd.runc.v2` still runs runc), writes that under harpoon's
run directory (named by its content), and runs the subcommand on it, from the project's
own directory. `config` itself, and a project compose cannot read, go to nerdctl as
given (its error is the user's answer).

Global flags are those before the subcommand (`harpoon compose -f x.yaml up`), as
nerdctl's help writes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from harpoon.system.layout import RUNTIME

#: nerdctl compose's global flags that take a value (cmd/nerdctl/compose/compose.go).
VALUE_FLAGS = frozenset({
    "-f", "--file", "-p", "--project-name", "--project-directory", "--env-file",
    "--profile", "--ipfs-address",
})  # fmt: skip
#: Subcommands run on the project as the user wrote it.
AS_WRITTEN = frozenset({"config", "version"})


class ComposeError(ValueError):
    """The compose project cannot be given harpoon's runtime; says why."""


def split(args: Sequence[str]) -> tuple[list[str], str, list[str]]:
    """(global flags, subcommand, its arguments) of `compose ARGS`; no subcommand: ""."""
    globals_: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("-") or arg == "-":
            return globals_, arg, list(args[index + 1 :])
        globals_.append(arg)
        if arg in VALUE_FLAGS:
            if index + 1 >= len(args):
                raise ComposeError(f"compose flag {arg} needs a value")
            globals_.append(args[index + 1])
            index += 1
        index += 1
    return globals_, "", []


def _flags(globals_: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """Each global flag (of `split`'s list) as (name, value, its tokens): `--file=x`
    and `-f x` are both ("-f"-like name, "x")."""
    flags: list[tuple[str, str, list[str]]] = []
    index = 0
    while index < len(globals_):
        name, equals, value = globals_[index].partition("=")
        tokens = [globals_[index]]
        if not equals and name in VALUE_FLAGS and index + 1 < len(globals_):
            value = globals_[index + 1]
            tokens.append(value)
            index += 1
        flags.append((name, value, tokens))
        index += 1
    return flags


def project_directory(globals_: Sequence[str], cwd: Path) -> Path:
    """Where compose resolves the project from: --project-directory, else the first
    compose file's directory, else cwd."""
    flags = _flags(globals_)
    directories = [value for name, value, _ in flags if name == "--project-directory"]
    files = [value for name, value, _ in flags if name in ("-f", "--file")]
    if directories:
        return cwd / directories[0]
    if files and files[0] != "-":
        return (cwd / files[0]).parent
    return cwd


def with_harpoon_runtime(config: str) -> str:
    """The resolved project (`compose config`'s YAML) with RUNTIME for each service
    that names no runtime."""
    project: Any = yaml.safe_load(config)
    if not isinstance(project, dict) or not isinstance(project.get("services"), dict):
        raise ComposeError("compose config printed no services")
    for name, service in project["services"].items():
        if not isinstance(service, dict):
            raise ComposeError(f"service {name!r} is not a mapping")
        if not service.get("runtime"):
            service["runtime"] = RUNTIME
    return yaml.safe_dump(project, sort_keys=False)


def write_project(config: str, directory: Path) -> Path:
    """The project written under `directory`, named by its content (the same project
    is one file however often it is run)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{hashlib.sha256(config.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        temporary = path.with_suffix(".tmp")
        temporary.write_text(config)
        temporary.replace(path)
    return path


def rewritten_args(
    globals_: Sequence[str], subcommand: str, rest: Sequence[str], project: Path, cwd: Path
) -> list[str]:
    """`compose` arguments that run the subcommand on the rewritten project: its
    file replaces the user's (-f); the project directory and the other global flags
    (the project's name, profiles) stay."""
    replaced = ("-f", "--file", "--project-directory", "--env-file")
    kept = [
        token for name, _, tokens in _flags(globals_) if name not in replaced for token in tokens
    ]
    directory = project_directory(globals_, cwd)
    return ["-f", str(project), "--project-directory", str(directory), *kept, subcommand, *rest]
