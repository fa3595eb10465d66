"""`harpoon compose`'s rewrite (harpoon.system.compose): which arguments are compose's
global flags, where the project lives, and each service given harpoon's runtime unless
it names one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harpoon.system import compose
from harpoon.system.layout import RUNTIME

CONFIG = """\
name: shop
services:
  web:
    image: nginx
  batch:
    image: busybox
    runtime: io.containerd.runc.v2
"""


@pytest.mark.parametrize(("args", "expected"), [
    (["up", "-d"], ([], "up", ["-d"])),
    (["-f", "x.yaml", "-p", "p", "logs", "-f", "web"],
     (["-f", "x.yaml", "-p", "p"], "logs", ["-f", "web"])),
    (["--file=x.yaml", "--profile", "dev", "ps"],
     (["--file=x.yaml", "--profile", "dev"], "ps", [])),
    (["-f", "x.yaml"], (["-f", "x.yaml"], "", [])),
])  # fmt: skip
def test_split_takes_the_flags_before_the_subcommand_as_global(
    args: list[str], expected: tuple[list[str], str, list[str]]
) -> None:
    assert compose.split(args) == expected


def test_a_global_flag_without_its_value_is_an_error() -> None:
    with pytest.raises(compose.ComposeError, match="-p needs a value"):
        compose.split(["-p"])


def test_the_project_directory_is_given_or_the_first_files_or_cwd(tmp_path: Path) -> None:
    assert compose.project_directory([], tmp_path) == tmp_path
    assert compose.project_directory(["-f", "app/c.yaml", "-f", "o.yaml"], tmp_path) == (
        tmp_path / "app"
    )
    assert compose.project_directory(["--file=/srv/c.yaml"], tmp_path) == Path("/srv")
    assert compose.project_directory(["-f", "a/c.yaml", "--project-directory", "b"], tmp_path) == (
        tmp_path / "b"
    )


def test_services_without_a_runtime_get_harpoons_and_the_others_keep_theirs() -> None:
    project = yaml.safe_load(compose.with_harpoon_runtime(CONFIG))
    assert project["name"] == "shop"
    assert project["services"]["web"]["runtime"] == RUNTIME
    assert project["services"]["batch"]["runtime"] == "io.containerd.runc.v2"


def test_a_config_without_services_is_refused() -> None:
    with pytest.raises(compose.ComposeError, match="no services"):
        compose.with_harpoon_runtime("name: empty\n")


def test_the_project_file_is_named_by_its_content(tmp_path: Path) -> None:
    first = compose.write_project(CONFIG, tmp_path / "compose")
    assert compose.write_project(CONFIG, tmp_path / "compose") == first
    assert first.read_text() == CONFIG
    assert compose.write_project(CONFIG + "# changed\n", tmp_path / "compose") != first


def test_the_rewritten_project_replaces_the_users_files_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    globals_ = ["-f", "app/compose.yaml", "--env-file", ".env.test", "-p", "shop"]
    args = compose.rewritten_args(globals_, "up", ["-d"], Path("/run/p.yaml"), tmp_path)
    assert args == [
        "-f", "/run/p.yaml", "--project-directory", str(tmp_path / "app"), "-p", "shop",
        "up", "-d",
    ]  # fmt: skip
