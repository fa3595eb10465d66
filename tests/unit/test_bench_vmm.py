"""bench/vmm.py's report (the cold-boot comparisons, the table) and the shim-log lines it
relies on (bench/shimlog.py), on made-up records and logs: no daemon, no VM."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench.shimlog import ShimLog
from bench.vmm import comparison, table


def test_comparison_is_the_ratio_of_medians_with_the_per_round_spread_and_the_difference() -> None:
    cold = [4.0, 6.0, 5.0]
    restored = [2.0, 2.0, 2.5]
    # Medians 5.0 and 2.0; rounds 2.0x, 3.0x, 2.0x.
    assert comparison(cold, restored) == "2.50x (2.00-3.00), +3.00 s"


def test_comparison_leaves_out_rounds_that_failed_on_either_side() -> None:
    assert (
        comparison([4.0, None, 9.0], [2.0, 1.0, None]) == "4.33x, +5.00 s"
    )  # medians 6.5 and 1.5; one pair
    assert comparison([None], [1.0]) == "n/a"


def _record() -> dict[str, Any]:
    def starts(mode: str, failed: list[list[str]]) -> list[dict[str, Any]]:
        return [{"id": f"c{i}", "mode": mode, "seconds": 1.0, "cold_reason": None,
                 "failed_boots": f} for i, f in enumerate(failed)]  # fmt: skip

    vfkit_starts = starts("cold", [[], ["no answer from the agent within 60 s"]])
    vfkit_starts[0]["cold_reason"] = "this VMM cannot restore guests"
    return {
        "began": "2026-12-06 21:00 UTC",
        "args": {"runs": 2},
        "seconds": 100.0,
        "machine": {"nproc": 2, "accelerator": "tcg"},
        "samples": {
            "runc": {"exit": [0.2, 0.2], "first-output": [0.1, 0.1], "vm": [None, None]},
            "qemu-template": {"exit": [2.0, 2.0], "first-output": [1.0, 1.0], "vm": [0.2] * 2},
            "qemu-cold": {"exit": [6.0, 6.0], "first-output": [5.0, 5.0], "vm": [3.0] * 2},
            "vfkit-double": {"exit": [8.0, 68.0], "first-output": [6.0, None], "vm": [4.0, 4.0]},
        },
        "starts": {
            "qemu-template": starts("template", [[], []]),
            "qemu-cold": starts("cold", [[], []]),
            "vfkit-double": vfkit_starts,
        },
        "floor": [2.0, 2.2],
        "failures": {"vfkit-double": ["printed b'', not b'hi\\n'"]},
        "load": [(1.0, 2.0), (2.0, 3.0)],
    }


def test_the_table_gives_each_column_its_ratio_to_runc_and_the_cold_boot_costs() -> None:
    text = table(_record())
    lines = text.splitlines()
    exit_row = next(
        line for line in lines if line.startswith("| `ctr run --rm --net-host busybox true`")
    )
    assert exit_row.split(" | ")[1:] == [
        "0.200 (0.200)",
        "2.00 (2.00)",
        "6.00 (6.00)",
        "38.0 (65.0) |",
    ]
    ratio_row = lines[lines.index(exit_row) + 1]
    assert ratio_row == "| ÷ runc | 1.00x | 10.0x | 30.0x | 190x |"
    assert "| VMs restored from a template | - | 2 of 2 | 0 of 2 | 0 of 2 |" in lines
    retried = "| runs whose first cold boot was given up on and booted again |"
    assert f"{retried} - | 0 of 2 | 0 of 2 | 1 of 2 |" in lines
    header = next(line for line in lines if "QEMU cold ÷ QEMU template" in line)
    assert header.split(" | ")[1:] == [
        "QEMU cold ÷ QEMU template", "vfkit double ÷ QEMU template", "vfkit double ÷ QEMU cold |"
    ]  # fmt: skip
    first_output = [line for line in lines if "echo hi`, launch → first output" in line][-1]
    # vfkit's second round failed: its ratio is its one run's.
    assert first_output.split(" | ")[1:] == [
        "5.00x (5.00-5.00), +4.00 s",
        "6.00x, +5.00 s",
        "1.20x, +1.00 s |",
    ]
    assert "vfkit-double: this VMM cannot restore guests" in text
    assert "not a Mac's" in text and "QEMU cold ÷ QEMU template" in text
    assert "Boot floor" in text and "2.10 (2.19) s over 2 boots" in text
    assert "vfkit-double c1: no answer from the agent within 60 s" in text
    assert "Failed runs (the JSON says why): vfkit-double 1" in text


def test_the_table_has_no_cold_boot_comparison_without_both_sides() -> None:
    record = _record()
    record["samples"] = {name: record["samples"][name] for name in ("runc", "qemu-cold")}
    record["starts"] = {"qemu-cold": record["starts"]["qemu-cold"]}
    text = table(record)
    assert "÷ QEMU template" not in text and "not a Mac's" not in text


def test_the_shim_log_counts_cold_boots_given_up_on(tmp_path: Path) -> None:
    log = tmp_path / "containerd.log"
    log.write_text(
        "time=x level=INFO msg=c1: this VMM cannot restore guests: booting cold runtime=harpoon\n"
        "time=x level=WARNING msg=boot attempt 1 of c1 failed: the agent connection failed "
        "(UNAVAILABLE: ttrpc: connection closed); console:\n runtime=harpoon\n"
        "time=x level=INFO msg=created c1: VM pid 7 started in 2.89 s (cold boot) runtime=harpoon\n"
        "time=x level=INFO msg=restored c2 from template k in 0.20 s runtime=harpoon\n"
        "time=x level=INFO msg=created c2: VM pid 8 started in 0.25 s (restored) runtime=harpoon\n"
    )

    async def read() -> tuple[Any, Any]:
        shims = ShimLog(log)
        return await shims.start("c1"), await shims.start("c2")

    first, second = asyncio.run(read())
    assert (first.seconds, first.mode) == (2.89, "cold")
    assert first.failed_boots == (
        "the agent connection failed (UNAVAILABLE: ttrpc: connection closed)",
    )
    assert first.cold_reason == "this VMM cannot restore guests"
    assert (second.seconds, second.mode, second.failed_boots) == (0.25, "template", ())
