"""Which VMM backend runs (harpoon.vmm.choice, harpoon.vmm.backend.default_backend):
$HARPOON_VMM, else harpoon's config file, else QEMU; a choice that cannot be followed
is an error naming where it was made."""

from __future__ import annotations

from pathlib import Path

import pytest

from harpoon.vmm import choice
from harpoon.vmm.backend import (
    BACKEND_NAMES,
    QemuBackend,
    VfkitBackend,
    backend_named,
    default_backend,
)
from harpoon.vmm.choice import BackendChoiceError


@pytest.fixture(autouse=True)
def no_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No choice from the environment, and the default config file one of the test's."""
    for variable in (choice.VMM_ENV, choice.CONFIG_ENV, "HARPOON_VFKIT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(choice, "DEFAULT_CONFIG_FILE", str(tmp_path / "etc-config.toml"))


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc-config.toml"
    path.write_text(text)
    return path


def test_without_a_choice_it_is_qemu_on_every_platform() -> None:
    assert choice.choose(BACKEND_NAMES) == choice.Choice("qemu", "the platform's default")
    assert isinstance(default_backend(), QemuBackend)


def test_the_environment_names_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(choice.VMM_ENV, "vfkit")
    assert isinstance(default_backend(), VfkitBackend)
    assert choice.choose(BACKEND_NAMES).origin == "$HARPOON_VMM"


def test_the_config_file_names_the_backend_and_where_vfkit_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = tmp_path / "my-vfkit"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    path = write_config(tmp_path, f'[vmm]\nbackend = "vfkit"\nvfkit = "{program}"\n')
    chosen = choice.choose(BACKEND_NAMES)
    assert chosen == choice.Choice("vfkit", str(path), str(program))
    backend = default_backend()
    assert isinstance(backend, VfkitBackend)
    assert backend.program() == str(program)
    # backend_named (the template builder's) finds it in the file too.
    assert backend_named("vfkit").program() == str(program)  # type: ignore[attr-defined]


def test_the_environment_wins_over_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, '[vmm]\nbackend = "vfkit"\n')
    monkeypatch.setenv(choice.VMM_ENV, "qemu")
    assert isinstance(default_backend(), QemuBackend)


def test_harpoon_config_names_another_file_which_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[vmm]\nbackend = "vfkit"\n')
    monkeypatch.setenv(choice.CONFIG_ENV, str(other))
    assert choice.choose(BACKEND_NAMES).name == "vfkit"
    monkeypatch.setenv(choice.CONFIG_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(BackendChoiceError, match=r"HARPOON_CONFIG='.*missing.toml': no such file"):
        default_backend()


def test_a_file_without_a_vmm_table_chooses_nothing(tmp_path: Path) -> None:
    write_config(tmp_path, "[other]\nkey = 1\n")
    assert choice.choose(BACKEND_NAMES).name == "qemu"


def test_a_bad_value_in_the_environment_names_the_variable_and_the_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(choice.VMM_ENV, "firecracker")
    with pytest.raises(
        BackendChoiceError,
        match=r"HARPOON_VMM='firecracker' names no VMM backend: use one of qemu, vfkit",
    ):
        default_backend()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[vmm]\nbackend = "hvf"\n',
            r"\[vmm\] backend = 'hvf' names no VMM backend: use one of qemu, vfkit",
        ),
        ("[vmm]\nbackend = 3\n", r"\[vmm\] backend must be a non-empty string, not 3"),
        ('[vmm]\nbackedn = "vfkit"\n', r"\[vmm\] has no key 'backedn'"),
        ('vmm = "vfkit"\n', r"vmm must be a table"),
        ("[vmm\n", r"is not TOML"),
    ],
)
def test_a_bad_config_file_names_the_file_and_what_it_may_say(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(BackendChoiceError, match=message) as raised:
        default_backend()
    assert str(raised.value).startswith(str(path))


def test_backend_named_knows_both_and_nothing_else() -> None:
    assert isinstance(backend_named("qemu"), QemuBackend)
    assert isinstance(backend_named("vfkit"), VfkitBackend)
    with pytest.raises(ValueError, match="no VMM backend 'kvm': harpoon has qemu, vfkit"):
        backend_named("kvm")


def test_the_vfkit_backend_describes_its_vmm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = VfkitBackend().host_vmm()
    assert (missing.program, missing.path, missing.accelerator) == ("vfkit", None, None)
    assert missing.install_hint == "brew install vfkit"
    program = tmp_path / "vfkit"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    found = VfkitBackend().host_vmm()
    assert found.path == str(program)
    # Off macOS a vfkit is harpoon's double, whose guests run in QEMU's TCG.
    import sys

    expected = "Virtualization.framework" if sys.platform == "darwin" else "tcg"
    assert found.accelerator == expected
