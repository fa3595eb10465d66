"""harpoon.agent.boot, PID 1's first steps: which boot modules it loads, in what order.

The real thing (finit_module in a booted guest) is tests/vm/test_guest_boot.py; here the
module loader is replaced to see the decisions alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harpoon.agent import boot
from harpoon.guest import build

MODULES = [
    "/lib/modules/k/kernel/drivers/virtio/virtio_ring.ko",
    "/lib/modules/k/kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "/lib/modules/k/kernel/drivers/virtio/virtio_pci.ko",
    "/lib/modules/k/kernel/drivers/char/virtio_console.ko",
]


def loaded_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pci_devices: list[str]
) -> list[str]:
    listing = tmp_path / "modules.boot"
    listing.write_text("".join(f"{m}\n" for m in MODULES))
    pci = tmp_path / "pci"
    pci.mkdir()
    for device in pci_devices:
        (pci / device).mkdir()
    monkeypatch.setattr(boot, "PCI_DEVICES_DIR", str(pci))
    loaded: list[str] = []
    monkeypatch.setattr(boot.linux, "load_module", lambda path: loaded.append(path) or True)
    boot.load_boot_modules(str(listing))
    return loaded


def test_without_a_pci_bus_the_pci_transport_is_not_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = loaded_with(tmp_path, monkeypatch, [])

    assert loaded == [MODULES[0], MODULES[3]]


def test_with_a_pci_bus_every_module_loads_in_the_listed_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert loaded_with(tmp_path, monkeypatch, ["0000:00:00.0"]) == MODULES


def test_a_module_that_fails_is_reported_and_the_others_still_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "modules.boot"
    listing.write_text(f"{MODULES[0]}\n{MODULES[3]}\n")
    loaded: list[str] = []

    def load(path: str) -> bool:
        if path == MODULES[0]:
            raise OSError(2, "No such file or directory")
        loaded.append(path)
        return True

    monkeypatch.setattr(boot.linux, "load_module", load)
    boot.load_boot_modules(str(listing))

    assert loaded == [MODULES[3]]
    assert f"harpoon-init: insmod {MODULES[0]} failed" in capsys.readouterr().err


def test_the_pci_only_names_are_real_boot_modules() -> None:
    assert (
        set(build.BOOT_MODULES)
        | {
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
        }
        >= boot.PCI_ONLY_MODULES
    )


def test_init_is_a_python_script_that_starts_the_boot_module() -> None:
    first, *rest = build.INIT_SCRIPT.splitlines()

    assert first == "#!/usr/bin/python3 -SB"
    compile("\n".join(rest), "/init", "exec")
    assert "from harpoon.agent.boot import start" in rest


def test_the_import_path_keeps_only_directories_that_can_hold_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guest_path = [
        "/",
        "/usr/lib/python311.zip",
        "/usr/lib/python3.11",
        "/usr/lib/python3.11/lib-dynload",
    ]
    monkeypatch.setattr(sys, "path", list(guest_path))

    boot.trim_import_path()

    assert sys.path == guest_path[2:]
