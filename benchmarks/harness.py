"""Timing loops and the comparison tables the benchmarks print, with a verdict per target."""

from __future__ import annotations

import math
import timeit
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# Run n iterations of something and return the seconds they took.
Run = Callable[[int], float]


def statement(stmt: str, namespace: dict[str, Any]) -> Run:
    """Return a Run of a timeit statement: a bare loop, with the garbage collector off."""
    return timeit.Timer(stmt, globals=namespace).timeit


def loop(call: Callable[[], object]) -> Run:
    """Return a Run that calls call n times (for work that dwarfs a Python call, like I/O)."""

    def run(n: int) -> float:
        start = timeit.default_timer()
        for _ in range(n):
            call()
        return timeit.default_timer() - start

    return run


def calibrate(run: Run, seconds: float) -> int:
    """Return the iteration count that makes run last about seconds."""
    n = 1
    while True:
        elapsed = run(n)
        if elapsed >= seconds / 10:
            return max(1, round(n * seconds / elapsed))
        n *= 2


def best_per_call(
    runs: Mapping[str, Run], *, repeats: int = 5, seconds: float = 0.2
) -> dict[str, float]:
    """Return each run's best seconds per iteration over repeats of about seconds each.

    The repeats are interleaved (a, b, c, a, b, c, ...) so that a slow spell of the machine
    falls on every candidate alike rather than on one of them.
    """
    counts = {name: calibrate(run, seconds) for name, run in runs.items()}
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run(counts[name]) / counts[name])
    return best


def format_value(value: float, unit: str) -> str:
    """Return value written with its unit for a table cell."""
    if unit == "ns":
        return f"{value:,.0f} ns"
    if unit == "us":
        return f"{value:,.1f} µs"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value:.4f} s"
    if unit == "KB":
        return f"{value:,.2f} KB"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "cmd":
        return f"{value:.1e}" if 0 < value < 0.001 else f"{value:.3f}"
    return f"{value:g}"


@dataclass(frozen=True)
class Target:
    """An upper limit on ours/baseline, or on ours itself."""

    limit: float
    applies_to: Literal["ratio", "ours"] = "ratio"


@dataclass(frozen=True)
class Row:
    """One line of a table: our figure, a baseline's, their ratio, and any target."""

    what: str
    ours: float
    baseline: float | None = None
    baseline_name: str = ""
    unit: str = "ns"
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        """Return ours/baseline, or None when there is nothing to divide by."""
        if self.baseline is None or self.baseline == 0:
            return None
        return self.ours / self.baseline

    @property
    def checked(self) -> float | None:
        """Return the figure the target limits."""
        if self.target is None:
            return None
        return self.ratio if self.target.applies_to == "ratio" else self.ours

    def cells(self) -> list[str]:
        """Return the row as the table's columns: what, ours, baseline, ratio, target."""
        baseline = ""
        if self.baseline is not None:
            baseline = f"{self.baseline_name} {format_value(self.baseline, self.unit)}".strip()
        ratio = "" if self.ratio is None else f"{self.ratio:.2f}x"
        target = ""
        if self.target is not None:
            if self.target.applies_to == "ratio":
                target = f"<= {self.target.limit:g}x"
            else:
                target = f"<= {format_value(self.target.limit, self.unit)}"
        return [self.what, format_value(self.ours, self.unit), baseline, ratio, target]


HEADER = ["what", "ours", "baseline", "ratio", "target"]


class Report:
    """Print one table per section as it is measured, then one verdict line per target."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def table(self, title: str, rows: Iterable[Row], notes: Iterable[str] = ()) -> None:
        """Print a section's table and keep its rows for the verdicts."""
        rows = list(rows)
        self.rows.extend(rows)
        lines = [HEADER, *(row.cells() for row in rows)]
        widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
        print(f"\n{title}")
        for i, line in enumerate(lines):
            print("  ".join(
                cell.ljust(width) if col == 0 else cell.rjust(width)
                for col, (cell, width) in enumerate(zip(line, widths, strict=True))
            ).rstrip())
            if i == 0:
                print("  ".join("-" * width for width in widths))
        for note in notes:
            print(f"  {note}")

    def verdicts(self) -> None:
        """Print whether each target is met; informational, never an error."""
        print()
        for row in self.rows:
            figure = row.checked
            if row.target is None or figure is None:
                continue
            if row.target.applies_to == "ratio":
                shown, limit = f"ours/{row.baseline_name} {figure:.2f}x", f"{row.target.limit:g}x"
            else:
                shown = f"ours {format_value(figure, row.unit)}"
                limit = format_value(row.target.limit, row.unit)
            verdict = "met" if figure <= row.target.limit else "NOT met"
            print(f"target: {row.what}: {shown} <= {limit}: {verdict}")
