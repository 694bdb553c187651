"""What the editing sweeps share (bench_sandbox_sweep.py, bench_real.py): the machine check, the rows'
columns, merging runs made in pieces, and the plot of strict metrics against N."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import cpu_busy_fraction
from eamet.metrics import RATE_KEYS

COLUMNS = ("edits", "method", "prefix_len", *RATE_KEYS, "misalignment_total", "edit_seconds")
SHORT = {"efficacy": "eff", "generalization": "gen", "specificity": "spec", "strict": "S", "lenient": "L"}


def check_idle(allow_busy: bool, threshold: float = 0.10) -> list[str]:
    """Prints how busy the CPUs are and the load average; exits when other work holds more than
    ``threshold`` of the CPUs, unless ``allow_busy`` (then it warns). Returns the load average."""
    busy = cpu_busy_fraction(1.0)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"# CPUs {busy:.0%} busy with other work at start, load average {' '.join(load)}", flush=True)
    if busy > threshold:
        if not allow_busy:
            sys.exit("the machine is busy: timings would be meaningless (pass --allow-busy to run anyway)")
        print("# warning: the machine is busy; the seconds below are not comparable", flush=True)
    return load


def merged(
    paths: Sequence[str], command: str, rows: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The commands and rows of earlier outputs at ``paths`` followed by this run's; this run's rows win
    over earlier ones with the same (edits, method, prefix length)."""

    def key(row: dict[str, Any]) -> tuple[int, str, int]:
        return row["edits"], row["method"], row["prefix_len"]

    commands: list[str] = []
    by_key: dict[tuple[int, str, int], dict[str, Any]] = {}
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        commands += earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
        by_key.update((key(row), row) for row in earlier["rows"])
    by_key.update((key(row), row) for row in rows)
    # Per N: the rows before editing first, then the methods in name order, each by prefix length.
    ordered = sorted(
        by_key.values(), key=lambda r: (r["edits"], r["method"] != "before", r["method"], r["prefix_len"])
    )
    return [*commands, command], ordered


def header(columns: Sequence[str] = COLUMNS) -> str:
    names = []
    for c in columns:
        for long, short in SHORT.items():
            c = c.replace(long, short)
        names.append(c.replace("_", " "))
    return " | ".join(names)


def format_row(row: dict[str, Any], columns: Sequence[str] = COLUMNS) -> str:
    cells = []
    for c in columns:
        value = row.get(c)
        cells.append("" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
    return " | ".join(cells)


def plot(rows: list[dict[str, Any]], path: str, methods: Sequence[str], title: str = "") -> None:
    """Strict efficacy, generalisation and specificity against N (log scale), one line per method and
    prefix length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prefix_len"] for r in rows})
    colors = ["grey", "tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, metric in zip(axes, ("efficacy", "generalization", "specificity"), strict=True):
        for method, color in zip(["before", *methods], colors, strict=False):
            for length, style in zip(lengths, ["-", "--", ":"], strict=False):
                pts = sorted(
                    (r["edits"], r[f"{metric}_strict"])
                    for r in rows
                    if r["method"] == method
                    and r["prefix_len"] == length
                    and r.get(f"{metric}_strict") is not None
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        style,
                        color=color,
                        marker="o",
                        markersize=3,
                        label=f"{method}, prefix {length}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{metric} (strict)")
        ax.set_xlabel("edits N")
    axes[0].set_ylabel("rate")
    axes[-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
