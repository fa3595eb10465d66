"""The results: a markdown table for people and a JSON document with every sample.

Pure formatting: takes what the run recorded, returns strings.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
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


def say(message: str) -> None:
    """A standalone bench's progress line: stderr, so stdout holds the table alone."""
    print(message, file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """SIGTERM ends the run as ^C does: through every clean-up on the way out."""

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


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
    for section in ("stdout", "stdin"):
        rates = {
            f.name.split(":", 1)[0]: f
            for f in figures
            if f.section == section and f.unit == "MiB/s"
        }
        runc, harpoon = rates.get("runc"), rates.get("harpoon")
        if runc and harpoon and runc.median and harpoon.median:
            ratio = number(harpoon.median / runc.median)
            lines.append(f"- {section} throughput, harpoon / runc: {ratio}x")
    return lines


def _quantity(figure: Figure, prefix: str) -> str | None:
    """What a figure of runtime `prefix` measures ("shim RSS"), or None if not its."""
    head = f"{prefix}: "
    return figure.name[len(head) :] if figure.name.startswith(head) else None


def compare(figures: Figures, new: str, baseline: str) -> list[dict[str, Any]]:
    """Every quantity measured for both `new` and `baseline` (figure name prefixes), with
    the ratio of medians and the spread that says whether it is beyond the run's noise.

    Both are measured in every round, one right after the other, so when neither has
    a failed run their i-th samples are a pair: the per-round ratios' min-max is the
    spread. `verdict` is "better" or "worse" when every round agrees (the range excludes
    1), else "within noise". Without pairs (a failed run) the two series' min-max ranges
    are compared instead: disjoint ranges are better or worse, overlapping ones noise.
    """
    by_quantity = {(f.section, q): f for f in figures if (q := _quantity(f, baseline))}
    rows = []
    for f in figures:
        quantity = _quantity(f, new)
        base = by_quantity.get((f.section, quantity or ""))
        if quantity is None or base is None or not f.samples or not base.samples:
            continue
        assert f.median is not None and base.median is not None
        if not base.median:
            continue
        row: dict[str, Any] = {
            "section": f.section, "quantity": quantity, "unit": f.unit,
            "higher_is_better": f.higher_is_better, "ratio": f.median / base.median,
            "baseline_spread": [min(base.samples) / base.median, max(base.samples) / base.median],
            "paired": False,
        }  # fmt: skip
        paired = len(f.samples) == len(base.samples) and not f.failures and not base.failures
        if paired and all(base.samples):
            per_round = [a / b for a, b in zip(f.samples, base.samples, strict=True)]
            row.update(paired=True, per_round=per_round, low=min(per_round), high=max(per_round))
            above, below = row["low"] > 1, row["high"] < 1
        else:
            above = min(f.samples) > max(base.samples)
            below = max(f.samples) < min(base.samples)
        if not (above or below):
            row["verdict"] = "within noise"
        else:
            row["verdict"] = "better" if above == f.higher_is_better else "worse"
        rows.append(row)
    return rows


def comparison_markdown(rows: list[dict[str, Any]], new: str, baseline: str) -> str:
    lines = [
        f"**{new} ÷ {baseline}** (same run, interleaved: each round runs both, {new} "
        f"first in odd rounds and {baseline} first in even ones). Ratio of medians; the "
        f"spread is the min-max of the per-round "
        f"ratios ({new}'s i-th run ÷ {baseline}'s i-th run), or, where a run failed and "
        f"rounds do not pair, each series' own min-max; {baseline}'s own run-to-run "
        f"spread is its min-max ÷ its median. A time or memory below 1x is better, a "
        f"rate above 1x.",
        "",
        f"| section | figure | {new} ÷ {baseline} | spread | {baseline} alone | verdict |",
        "|---|---|---:|---|---|---|",
    ]
    for row in rows:
        if row["paired"]:
            spread = f"{row['low']:.3f}-{row['high']:.3f}x per round"
        else:
            spread = "unpaired (a run failed): series' min-max compared"
        low, high = row["baseline_spread"]
        lines.append(
            f"| {row['section']} | {row['quantity']} ({row['unit']}) | "
            f"**{row['ratio']:.3f}x** | {spread} | {low:.3f}-{high:.3f}x its median "
            f"| {row['verdict']} |"
        )
    return "\n".join(lines)


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
        f"{_baseline_line(meta)}"
        f"- {meta['runs']} runs per figure (concurrency: {meta['concurrency_runs']} rounds of "
        f"{meta['containers']} containers), baselines interleaved; p95 = the 95th-percentile "
        f"worst run (5th percentile for rates); whole run {meta['duration_s']:.0f} s\n"
    )  # fmt: skip


def _baseline_line(meta: dict[str, Any]) -> str:
    b = meta.get("baseline")
    if not b:
        return ""
    template = b["template"] or ("templates off" if meta["templates"] == "off" else "none")
    return (
        f"- baseline **{b['label']}** = {b['commit'][:12]} (`--baseline-commit {b['rev']}`), "
        f"runtime {b['runtime']}, its own guest {(b['guest_digest'] or '?')[:12]} and "
        f"template ({template}), measured beside harpoon in every round\n"
    )


def markdown(meta: dict[str, Any], figures: Figures, shimtest: ShimtestResult | None) -> str:
    parts = [header(meta), table(figures)]
    extra = ratios(figures)
    if extra:
        parts.append("Ratios of medians:\n\n" + "\n".join(extra))
    if meta.get("baseline"):
        label = meta["baseline"]["label"]
        rows = compare(figures, "harpoon", label)
        if rows:
            parts.append(comparison_markdown(rows, "harpoon", label))
    text = "\n\n".join(parts) + "\n" + shimtest_markdown(shimtest)
    return text


def to_json(
    meta: dict[str, Any], figures: Figures, shimtest: ShimtestResult | None
) -> dict[str, Any]:
    baseline = meta.get("baseline")
    return {
        **meta,
        "figures": [f.to_json() for f in figures],
        "comparison": compare(figures, "harpoon", baseline["label"]) if baseline else None,
        "shimtest": None if shimtest is None else {
            "benchmarks": shimtest.benchmarks, "error": shimtest.error,
        },
    }  # fmt: skip


#: Where every benchmark writes its record.
RESULTS = Path(__file__).resolve().parent / "results"


def print_and_save(kind: str, table_text: str, record: dict[str, Any]) -> Path:
    """Prints a standalone benchmark's table, its failures and leftovers, and writes its
    record to bench/results/<kind>-<UTC timestamp>.json (returned)."""
    print(table_text)
    if record.get("failures"):
        print(f"\nfailures: {json.dumps(record['failures'], indent=1)}")
    if record.get("leftovers"):
        print(f"\nleft behind (and removed where the clean-up could): {record['leftovers']}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"{kind}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    return path
