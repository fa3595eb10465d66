"""The guest's Python closure: sourceless .pyc, symlinks inside a tree, measured imports."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

from harpoon.guest import elf, python_runtime


def test_a_sourceless_pyc_imports_and_names_its_guest_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = b"def where():\n    raise RuntimeError('here')\nVALUE = 42\n"
    (tmp_path / "guestmod.pyc").write_bytes(
        python_runtime.compile_pyc(source, "/usr/lib/python3.11/guestmod.py")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "guestmod", raising=False)

    module = importlib.import_module("guestmod")

    assert module.VALUE == 42
    assert module.where.__code__.co_filename == "/usr/lib/python3.11/guestmod.py"


def test_the_same_source_compiles_to_the_same_pyc() -> None:
    source = b"import os\nX = [1, 2, 'three']\n"

    assert python_runtime.compile_pyc(source, "/x.py") == python_runtime.compile_pyc(
        source, "/x.py"
    )


def test_absolute_symlinks_resolve_inside_the_tree_not_on_the_host(tmp_path: Path) -> None:
    (tmp_path / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib/x86_64-linux-gnu/ld.so").write_bytes(b"loader")
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64/ld.so").symlink_to("/lib/x86_64-linux-gnu/ld.so")
    (tmp_path / "lib/x86_64-linux-gnu/libz.so.1").symlink_to("ld.so")

    assert python_runtime.resolve_in_root(tmp_path, "lib64/ld.so").read_bytes() == b"loader"
    resolved = python_runtime.resolve_in_root(tmp_path, "/lib/x86_64-linux-gnu/libz.so.1")
    assert resolved == tmp_path / "lib/x86_64-linux-gnu/ld.so"


def test_the_closure_lists_what_an_entry_module_imports(tmp_path: Path) -> None:
    (tmp_path / "probe_pkg").mkdir()
    (tmp_path / "probe_pkg/__init__.py").write_text("import json\nimport _struct\n")

    modules = python_runtime.imported_modules([tmp_path], "probe_pkg", extra=["encodings"])

    assert modules["probe_pkg"] == str(tmp_path / "probe_pkg/__init__.py")
    assert "json.decoder" in modules
    assert "encodings.utf_8" in modules
    assert "os.path" not in modules  # an alias, not a module of its own


def test_excluded_modules_are_unimportable_while_measuring(tmp_path: Path) -> None:
    (tmp_path / "uses_ssl.py").write_text(
        "try:\n    import ssl\nexcept ImportError:\n    ssl = None\n"
    )

    modules = python_runtime.imported_modules([tmp_path], "uses_ssl", extra=[], excluded=["ssl"])

    assert "uses_ssl" in modules
    assert "ssl" not in modules and "_ssl" not in modules


def test_a_broken_entry_module_is_reported_with_its_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")

    with pytest.raises(python_runtime.PythonRuntimeError, match="no_such_module_here"):
        python_runtime.imported_modules([tmp_path], "broken", extra=[])


def test_harpoon_sources_are_only_the_guest_packages(tmp_path: Path) -> None:
    for relative in ("__init__.py", "agent/main.py", "api/regen.py", "shim/cli.py", "cli.py"):
        (tmp_path / "harpoon" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "harpoon" / relative).write_text("")

    assert sorted(python_runtime.harpoon_sources(tmp_path)) == ["__init__.py", "agent/main.py"]


@pytest.mark.skipif(shutil.which("ls") is None, reason="needs a dynamically linked ls")
def test_needed_libraries_and_loader_are_read_from_a_real_binary() -> None:
    data = Path(shutil.which("ls") or "").resolve().read_bytes()

    assert "libc.so.6" in elf.needed(data)
    loader = elf.interpreter(data)
    assert loader is not None and loader.startswith("/lib")
