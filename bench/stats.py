"""Figures: named series of samples and their median and p95.

A `Figure` keeps every sample and every failed run; the summary is computed when the
report is written. "p95" is the 95th-percentile *worst* value: the 95th percentile of a
time (lower is better), the 5th percentile of a rate (higher is better), so that the
column always reads "95 % of runs did at least this well".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) by linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Figure:
    """One measured quantity, e.g. "harpoon `ctr run --rm` wall time", in one unit."""

    section: str
    name: str
    unit: str
    higher_is_better: bool = False
    samples: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: Set when the figure cannot be measured at all (e.g. "not implemented: …").
    unavailable: str | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def fail(self, reason: str) -> None:
        self.failures.append(reason)

    @property
    def median(self) -> float | None:
        return quantile(self.samples, 0.5) if self.samples else None

    @property
    def p95(self) -> float | None:
        if not self.samples:
            return None
        return quantile(self.samples, 0.05 if self.higher_is_better else 0.95)

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "median": self.median,
            "p95": self.p95,
            "n": len(self.samples),
            "samples": self.samples,
            "failures": self.failures,
            "unavailable": self.unavailable,
            "notes": self.notes,
        }


class Figures:
    """The figures of one benchmark run, in the order they were first named."""

    def __init__(self) -> None:
        self._figures: dict[tuple[str, str], Figure] = {}

    def get(self, section: str, name: str, unit: str, *, higher_is_better: bool = False) -> Figure:
        key = (section, name)
        if key not in self._figures:
            self._figures[key] = Figure(section, name, unit, higher_is_better)
        return self._figures[key]

    def matching(self, section: str, prefix: str) -> list[Figure]:
        """The figures of `section` whose name starts with `prefix`."""
        return [f for f in self if f.section == section and f.name.startswith(prefix)]

    def __iter__(self) -> Iterator[Figure]:
        return iter(self._figures.values())
