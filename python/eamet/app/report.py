"""A run's results for people and programs: the table ``eamet demo`` and ``eamet eval`` print, and their JSON
file (design.md §2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eamet.base.metrics import RATE_KEYS

__all__ = ["format_table", "write_json"]


def _cell(value: Any, form: str = "{:.3f}") -> str:
    return "—" if value is None else form.format(value) if isinstance(value, float) else str(value)


def format_table(run: dict[str, Any]) -> str:
    """The run as a text table: one row per model state (before, then each method), strict and lenient
    side by side."""
    header = [
        "",
        "eff strict",
        "eff lenient",
        "gen strict",
        "gen lenient",
        "spec strict",
        "spec lenient",
        "fluency",
        "misalign",
        "seconds",
    ]
    rows = [
        [
            "before",
            *(_cell(run["before"].get(k)) for k in RATE_KEYS),
            _cell(run["before"].get("fluency")),
            "",
            "",
        ]
    ]
    for method, metrics in run["results"].items():
        rows.append(
            [
                method,
                *(_cell(metrics.get(k)) for k in RATE_KEYS),
                _cell(metrics.get("fluency")),
                _cell(metrics.get("misalignment_total"), "{:.4g}"),
                _cell(metrics.get("edit_seconds"), "{:.1f}"),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(run: dict[str, Any], path: str | Path) -> None:
    """Writes the run's JSON (indented)."""
    Path(path).write_text(json.dumps(run, indent=1) + "\n")
