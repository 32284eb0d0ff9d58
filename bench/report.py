"""The benchmark report: figures with their targets, written as JSON and printed as a summary."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """`metric` of a figure must stay below `limit` (strictly), e.g. p99_ms < 2."""

    metric: str
    limit: float
    unit: str

    def describe(self) -> str:
        return f"{self.metric} < {self.limit:g} {self.unit}"


@dataclass
class Figure:
    """One measured quantity: its values, its targets (none: reported only) and what a reader must know."""

    key: str
    title: str
    values: dict[str, Any]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def verdicts(self) -> list[tuple[Target, float | None, bool]]:
        """Per target: the measured value (None if the run did not produce it) and whether it passed."""
        out = []
        for target in self.targets:
            value = self.values.get(target.metric)
            measured = float(value) if isinstance(value, (int, float)) else None
            out.append((target, measured, measured is not None and measured < target.limit))
        return out

    @property
    def passed(self) -> bool | None:
        verdicts = self.verdicts()
        return all(ok for _, _, ok in verdicts) if verdicts else None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "values": self.values,
            "targets": [
                {"metric": t.metric, "limit": t.limit, "unit": t.unit, "measured": v, "passed": ok}
                for t, v, ok in self.verdicts()
            ],
            "passed": self.passed,
            "notes": self.notes,
        }


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU model and count, kernel, Python."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def build_report(figures: list[Figure], started: str, duration_s: float, quick: bool) -> dict[str, Any]:
    failed = [f.key for f in figures if f.passed is False]
    return {
        "started": started,
        "duration_s": round(duration_s, 1),
        "quick": quick,
        "machine": machine(),
        "all_targets_met": not failed,
        "missed": failed,
        "figures": [f.to_json() for f in figures],
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def render(figures: list[Figure]) -> str:
    """A readable summary: one block per figure, its values, then PASS/MISS per target."""
    lines = []
    for figure in figures:
        mark = {True: "PASS", False: "MISS", None: "info"}[figure.passed]
        lines.append(f"[{mark}] {figure.title}")
        for key, value in figure.values.items():
            lines.append(f"         {key}: {_value(value)}")
        for target, measured, ok in figure.verdicts():
            shown = "not measured" if measured is None else f"{measured:g}"
            lines.append(f"         target {target.describe()}: {shown} -> {'pass' if ok else 'MISSED'}")
        for note in figure.notes:
            lines.append(f"         note: {note}")
    return "\n".join(lines)
