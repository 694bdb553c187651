"""What the editing sweeps share (bench_sandbox_sweep.py, bench_real.py): the machine check, the rows'
columns, merging runs made in pieces, and the plot of strict metrics against N."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import cpu_busy_fraction
from eamet.base.metrics import RATE_KEYS

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
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    keys = ("efficacy_strict", "generalization_strict", "specificity_strict", "misalignment_total")
    for ax, key in zip(axes, keys, strict=True):
        for method, color in zip(["before", *methods], colors, strict=False):
            for length, style in zip(lengths, ["-", "--", ":"], strict=False):
                pts = sorted(
                    (r["edits"], r[key])
                    for r in rows
                    if r["method"] == method and r["prefix_len"] == length and r.get(key) is not None
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
        ax.set_xlabel("edits N")
        if key == "misalignment_total":
            ax.set_yscale("log")
            ax.set_title("misalignment total")
        else:
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(key.replace("_strict", " (strict)"))
    axes[0].set_ylabel("rate")
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7)  # the rates carry "before" too
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """``rows`` as a Markdown table (rates to 3 decimals, other numbers to 2)."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) <= 1.0 else f"{value:.2f}"
        return str(value)

    lines = [f"| {header(columns)} |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    """Joins sweep outputs made in pieces, without running anything:
    ``python benches/sweeps.py A.json B.json --json ALL.json --plot ALL.png --markdown``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("inputs", nargs="+", help="--json outputs of bench_real.py / bench_sandbox_sweep.py")
    parser.add_argument("--json", help="write the joined rows here")
    parser.add_argument("--plot", help="write a PNG of strict metrics and misalignment against N")
    parser.add_argument("--title", default="")
    parser.add_argument("--methods", help="comma-separated methods to keep (default: all; 'before' always)")
    parser.add_argument("--markdown", action="store_true", help="print the rows as a Markdown table")
    parser.add_argument("--columns", help="comma-separated columns for --markdown")
    args = parser.parse_args()
    outputs = [json.loads(Path(path).read_text()) for path in args.inputs]
    _, rows = merged(args.inputs[:-1], "", outputs[-1]["rows"])  # later files win, as in --merge
    commands = list(dict.fromkeys(c for output in outputs for c in output.get("commands", [])))
    methods = sorted({r["method"] for r in rows} - {"before"})
    if args.methods:
        methods = [m for m in args.methods.split(",") if m != "before"]
        rows = [r for r in rows if r["method"] == "before" or r["method"] in methods]
    if args.json:
        payload = {"commands": commands, "load_average": outputs[-1].get("load_average"), "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot, methods, title=args.title)
    if args.markdown:
        print(markdown(rows, args.columns.split(",") if args.columns else COLUMNS))


if __name__ == "__main__":
    main()
