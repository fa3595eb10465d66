"""The results: a markdown table for people and a JSON document with every sample.

Pure formatting: takes what the run recorded, returns strings.
"""

from __future__ import annotations

from typing import Any

from bench.floor import FLOOR_FIGURE, PYTHON_FLOOR_FIGURE
from bench.shimtest import ShimtestResult
from bench.stats import Figure, Figures

#: Characters of a failure message quoted in the table (the JSON has all of it).
NOTE_CHARS = 160

#: (figure, figure, what the ratio says) pairs whose median ratio is worth a line.
RATIOS = (
    ("harpoon: `ctr run --rm … echo hi`", "runc: `ctr run --rm … echo hi`",
     "harpoon / runc, `ctr run --rm … echo hi`"),
    ("harpoon: `ctr run --rm … echo hi`", FLOOR_FIGURE,
     "harpoon `ctr run --rm … echo hi` / boot floor"),
    (PYTHON_FLOOR_FIGURE, FLOOR_FIGURE, "CPython floor / boot floor"),
    ("harpoon: VM start → agent ready, cold boot (shim log)", FLOOR_FIGURE,
     "harpoon cold VM boot / boot floor"),
    ("harpoon: VM start → agent ready, restored from template (shim log)", FLOOR_FIGURE,
     "harpoon template restore / boot floor"),
)  # fmt: skip


def number(value: float) -> str:
    """Three significant digits or so, without exponents."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(value: float | None, unit: str) -> str:
    return f"{number(value)} {unit}" if value is not None else "—"


def _notes(figure: Figure) -> str:
    notes = list(figure.notes)
    if figure.unavailable:
        notes.insert(0, figure.unavailable)
    if figure.failures:
        first = figure.failures[0].replace("\n", " ")[:NOTE_CHARS]
        notes.append(f"{len(figure.failures)} failed run(s); first: {first}")
    return "; ".join(notes).replace("|", "\\|")


def table(figures: Figures) -> str:
    lines = [
        "| section | figure | median | p95 | n | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.section} | {f.name} | {_cell(f.median, f.unit)} | {_cell(f.p95, f.unit)} "
            f"| {len(f.samples)} | {_notes(f)} |"
        )
    return "\n".join(lines)


def ratios(figures: Figures) -> list[str]:
    by_name = {f.name: f for f in figures}
    lines = []
    for top, bottom, label in RATIOS:
        a, b = by_name.get(top), by_name.get(bottom)
        if a and b and a.median is not None and b.median:
            lines.append(f"- {label}: {number(a.median / b.median)}x")
    stdout = [f for f in figures if f.section == "stdout" and f.unit == "MiB/s"]
    if len(stdout) == 2 and all(f.median for f in stdout):
        runc, harpoon = sorted(stdout, key=lambda f: not f.name.startswith("runc"))
        assert runc.median and harpoon.median
        ratio = number(harpoon.median / runc.median)
        lines.append(f"- stdout throughput, harpoon / runc: {ratio}x")
    return lines


def shimtest_markdown(result: ShimtestResult | None) -> str:
    if result is None:
        return ""
    if result.error:
        return f"\n**shimtest**: {result.error}\n"
    lines = ["", "**shimtest** (go test -bench; means over its runs)", "",
             "| benchmark | metrics |", "|---|---|"]  # fmt: skip
    for name, metrics in result.benchmarks.items():
        cells = ", ".join(f"{number(v)} {u}" for u, v in metrics.items())
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def header(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    git = m["git"]
    commit = (git["commit"] or "unknown")[:12] + (
        " (modified: " + ", ".join(git["modified"]) + ")" if git["dirty"] else ""
    )
    return (
        f"# harpoon benchmarks, {meta['started']}\n\n"
        f"- commit {commit}\n"
        f"- containerd {meta['containerd']['version']} (flavour {meta['containerd']['flavour']}),"
        f" {m['runc'] or 'runc ?'}, {m['qemu'] or 'QEMU ?'}, accelerator **{m['accelerator']}**\n"
        f"- {m['nproc']} x {m['cpu_model']}, {m['memory_mib']} MiB, {m['os']}, kernel "
        f"{m['kernel']}; guest kernel {meta['guest']['kernel_release']}\n"
        f"- {meta['runs']} runs per figure (concurrency: {meta['concurrency_runs']} rounds of "
        f"{meta['containers']} containers), baselines interleaved; p95 = the 95th-percentile "
        f"worst run (5th percentile for rates); whole run {meta['duration_s']:.0f} s\n"
    )  # fmt: skip


def markdown(meta: dict[str, Any], figures: Figures, shimtest: ShimtestResult | None) -> str:
    parts = [header(meta), table(figures)]
    extra = ratios(figures)
    if extra:
        parts.append("Ratios of medians:\n\n" + "\n".join(extra))
    text = "\n\n".join(parts) + "\n" + shimtest_markdown(shimtest)
    return text


def to_json(
    meta: dict[str, Any], figures: Figures, shimtest: ShimtestResult | None
) -> dict[str, Any]:
    return {
        **meta,
        "figures": [f.to_json() for f in figures],
        "shimtest": None if shimtest is None else {
            "benchmarks": shimtest.benchmarks, "error": shimtest.error,
        },
    }  # fmt: skip
