"""The bench's result: one row per figure, printed as a table and written as JSON.

Every row puts the gateway next to its baseline from the same run (direct to the same
upstream or backend), then the difference that the target is about: milliseconds added,
or the gateway's share of the direct figure. A missed target is a result, not an error:
the row says MISSED and the bench still exits 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ADDED, RATIO = "added", "ratio"
DECIMALS = {"ms": 3, "s": 2, "req/s": 0, "tok/s": 1, "MB": 1, "count": 0, "us": 1, "chunk/s": 0}


@dataclass(frozen=True)
class Row:
    """One figure, direct against the gateway; `met` is None for rows without a target."""

    scenario: str
    metric: str
    unit: str
    direct: float | None
    gateway: float | None
    compare: str | None = None  # ADDED, RATIO or None
    target: str = ""
    met: bool | None = None

    @property
    def delta(self) -> float | None:
        """gateway - direct (ADDED) or gateway / direct (RATIO)."""
        if self.direct is None or self.gateway is None or self.compare is None:
            return None
        if self.compare == ADDED:
            return self.gateway - self.direct
        return self.gateway / self.direct if self.direct else None

    def as_json(self) -> dict:
        return {**asdict(self), "delta": self.delta}


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    wall_seconds: float = 0.0

    def as_json(self) -> dict:
        return {
            "rows": [row.as_json() for row in self.rows],
            "targets": {
                "met": sum(row.met is True for row in self.rows),
                "missed": sum(row.met is False for row in self.rows),
            },
            "notes": self.notes,
            "settings": self.settings,
            "wall_seconds": round(self.wall_seconds, 1),
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")


def number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.{DECIMALS.get(unit, 2)}f}"


def delta_text(row: Row) -> str:
    delta = row.delta
    if delta is None:
        return "-"
    if row.compare == RATIO:
        return f"x{delta:.3f}"
    return f"{delta:+.{DECIMALS.get(row.unit, 2)}f} {row.unit}"


def verdict(row: Row) -> str:
    return {True: "met", False: "MISSED", None: ""}[row.met]


def render_table(report: Report) -> str:
    """A plain-text table that lines up in a terminal and pastes into Markdown as-is."""
    header = ("scenario", "metric", "unit", "direct", "llamagate", "added / ratio", "target", "")
    lines = [header]
    for row in report.rows:
        lines.append(
            (
                row.scenario,
                row.metric,
                row.unit,
                number(row.direct, row.unit),
                number(row.gateway, row.unit),
                delta_text(row),
                row.target,
                verdict(row),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    met = sum(row.met is True for row in report.rows)
    missed = sum(row.met is False for row in report.rows)
    text.append(f"\ntargets: {met} met, {missed} missed; wall time {report.wall_seconds:.0f}s")
    text += [f"note: {note}" for note in report.notes]
    return "\n".join(text)
