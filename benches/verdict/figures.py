"""The verdict's tables, figures and crossing points, from the cells that benches/verdict/cells.sh wrote.

    python benches/verdict/figures.py docs/verdict --markdown            # one table per N
    python benches/verdict/figures.py docs/verdict --crossings           # where each curve falls below 50 %
    python benches/verdict/figures.py docs/verdict --gaps                # the gap: λ's share, alignment's
    python benches/verdict/figures.py docs/verdict --predictors          # what predicts which facts fail
    python benches/verdict/figures.py docs/verdict --forecast            # capacity report against solve
    python benches/verdict/figures.py docs/verdict --overlap             # the facts alignment rescues
    python benches/verdict/figures.py docs/verdict --plot docs/verdict   # efficacy.png, misalignment.png,
                                                                         # leverage.png

Reads every ``cells-N.json`` (bench_real.py's rows, one per cell) and ``capacity-N.json`` (the capacity
report's λ pick) in the folder; runs nothing. A cell's name is ``METHOD[-b4]-LAMBDA`` as cells.sh gives it:
METHOD ``memit``, ``gated`` (EAMET + ``align_below_nll``) or ``eamet`` (EAMET as specified), ``-b4`` for
block 4 alone, LAMBDA ``558.1``, ``2093.0`` or ``cap`` (the capacity report's pick at that N).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = {"memit": "MEMIT", "gated": "EAMET gated", "eamet": "EAMET as specified"}
LAMBDAS = {"558.1": "λ 558", "2093.0": "λ 2093", "cap": "capacity pick"}
COLORS = {"memit": "tab:red", "gated": "tab:blue", "eamet": "tab:green"}
THRESHOLD = 0.5
_NAME = re.compile(r"^(?P<method>memit|gated|eamet)(?P<b4>-b4)?-(?P<lam>558\.1|2093\.0|cap)$")


@dataclass(frozen=True)
class Cell:
    """One (N, method, blocks, λ) edit of the sweep and what it measured."""

    n: int
    method: str
    blocks: str  # "3–4" or "4"
    lam: str  # a key of LAMBDAS
    row: dict[str, Any]

    @property
    def curve(self) -> tuple[str, str, str]:
        return self.method, self.blocks, self.lam

    def get(self, key: str) -> float:
        value = self.row.get(key)
        return math.nan if value is None else float(value)

    @property
    def leverage(self) -> list[float]:
        """The solve's mean leverage per edited block, in block order."""
        lev = self.row.get("mean_leverage") or {}
        return [float(lev[k]) for k in sorted(lev, key=int)]


def load(folder: Path) -> tuple[list[Cell], dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """The cells of every ``cells-N.json`` in ``folder``, the unedited rows by N, and the capacity reports
    by N."""
    cells: list[Cell] = []
    before: dict[int, dict[str, Any]] = {}
    capacity: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("cells-*.json")):
        if not re.fullmatch(r"cells-\d+\.json", path.name):
            continue  # cells.sh's cells-N.prev.json
        for row in json.loads(path.read_text())["rows"]:
            if row.get("prefix_len", 0) != 0:
                continue
            if row["method"] == "before":
                before[row["edits"]] = row
                continue
            match = _NAME.match(row["method"])
            if match is None:
                raise SystemExit(f"{path}: unknown cell name {row['method']!r}")
            blocks = "4" if match["b4"] else "3–4"
            cells.append(Cell(row["edits"], match["method"], blocks, match["lam"], row))
    for path in sorted(folder.glob("capacity-*.json")):
        capacity[int(path.stem.split("-")[1])] = json.loads(path.read_text())
    if not cells:
        raise SystemExit(f"no cells-N.json with cells in {folder}")
    return cells, before, capacity


def crossing(points: Sequence[tuple[int, float]], threshold: float = THRESHOLD) -> str:
    """Where a curve of (N, rate) points, in N order, first falls below ``threshold``: N interpolated
    linearly in log N between the last point at or above it and the first below it."""
    points = [(n, r) for n, r in points if not math.isnan(r)]
    if not points:
        return "no cells"
    if points[0][1] < threshold:
        return f"< {points[0][0]} (already {points[0][1]:.2f})"
    for (n0, r0), (n1, r1) in itertools.pairwise(points):
        if r1 < threshold <= r0:
            frac = (r0 - threshold) / (r0 - r1)
            at = math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0)))
            return f"≈ {at:.0f} ({n0}: {r0:.2f}, {n1}: {r1:.2f})"
    n, r = points[-1]
    return f"not yet ({r:.2f} at {n}{projection(points, threshold)})"


def projection(points: Sequence[tuple[int, float]], threshold: float = THRESHOLD) -> str:
    """Where a curve that has not yet fallen below ``threshold`` would, if it kept the slope of its last
    step (linear in log N): a rough guide for how far a sweep must go, not a measurement — curves that
    collapse bend down, so the real crossing is at or before it."""
    if len(points) < 2:
        return ""
    (n0, r0), (n1, r1) = points[-2:]
    per_doubling = (r1 - r0) / math.log2(n1 / n0)
    if per_doubling >= 0:
        return "; no fall over the last step"
    at = n1 * 2 ** ((r1 - threshold) / -per_doubling)
    return f"; at the last step's slope ≈ {at:,.0f}"


def curves(cells: Iterable[Cell]) -> dict[tuple[str, str, str], list[Cell]]:
    """The cells grouped by (method, blocks, λ), each group in N order."""
    out: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in sorted(cells, key=lambda c: c.n):
        out.setdefault(cell.curve, []).append(cell)
    return out


def _order(curve: tuple[str, str, str]) -> tuple[int, int, int]:
    method, blocks, lam = curve
    return list(LAMBDAS).index(lam), blocks != "3–4", list(METHODS).index(method)


def _lambda_text(cell: Cell, capacity: dict[int, dict[str, Any]]) -> str:
    if cell.lam != "cap":
        return f"{float(cell.lam):.0f}"
    lams = capacity.get(cell.n, {}).get("lambda_for", {}).get("lambdas")
    if not lams:
        return "cap"
    picked = lams if cell.blocks == "3–4" else lams[-1:]
    return "cap (" + " / ".join(f"{x:.0f}" for x in picked) + ")"


def markdown(
    cells: list[Cell], before: dict[int, dict[str, Any]], capacity: dict[int, dict[str, Any]]
) -> str:
    """One table per N: every cell's strict and lenient rates, the solve's leverage and the misalignment;
    with the known cases' strict efficacy where some cases are not known."""
    lines: list[str] = []
    for n in sorted({c.n for c in cells}):
        at_n = sorted((c for c in cells if c.n == n), key=lambda c: _order(c.curve))
        known = at_n[0].row.get("known_cases")
        evaluated = at_n[0].row.get("evaluated", n)
        sample = f"{evaluated} of {n} cases evaluated, spread" if evaluated < n else "all cases evaluated"
        lines.append(f"#### N = {n} ({sample}" + (f"; {known} of them known)" if known is not None else ")"))
        if n in before:
            b = before[n]
            lines.append(
                f"Unedited: efficacy {b['efficacy_strict']:.3f} / {b['efficacy_lenient']:.3f}, "
                f"generalisation {b['generalization_strict']:.3f}, "
                f"specificity {b['specificity_strict']:.3f} strict / {b['specificity_lenient']:.3f} lenient."
            )
        show_known = known is not None and known != n
        head = ["method", "blocks", "λ", "eff S", "eff L", "gen S", "gen L", "spec S", "spec L"]
        head += ["known eff S"] if show_known else []
        head += ["mean leverage", "misalignment"]
        lines += ["", "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
        for c in at_n:
            values = [METHODS[c.method], c.blocks, _lambda_text(c, capacity)]
            for key in ("efficacy", "generalization", "specificity"):
                values += [f"{c.get(key + '_strict'):.3f}", f"{c.get(key + '_lenient'):.3f}"]
            if show_known:
                values.append(f"{c.get('known_efficacy_strict'):.3f}")
            values += [" / ".join(f"{x:.2f}" for x in c.leverage), f"{c.get('misalignment_total'):.1f}"]
            lines.append("| " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def crossings(cells: list[Cell]) -> str:
    """Per curve: where strict efficacy falls below 50 %, and the strict efficacy at every N."""
    sizes = sorted({c.n for c in cells})
    head = ["method", "blocks", "λ", *(f"N={n}" for n in sizes), "below 50 % strict at"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(sizes) + "---|"]
    for curve, group in sorted(curves(cells).items(), key=lambda kv: _order(kv[0])):
        by_n = {c.n: c.get("efficacy_strict") for c in group}
        rates = [f"{by_n[n]:.3f}" if n in by_n else "" for n in sizes]
        where = crossing([(c.n, c.get("efficacy_strict")) for c in group])
        values = [METHODS[curve[0]], curve[1], LAMBDAS[curve[2]], *rates, where]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def gaps(cells: list[Cell]) -> str:
    """Per N and block choice, strict efficacy split into what λ does and what the alignment does.

    The reference's MEMIT preset is λ 2093 and eamet's EAMET preset λ 558, so their difference (gated −
    MEMIT at the presets) is the λ effect (MEMIT at 558 − MEMIT at 2093) plus the alignment effect at λ 558
    (gated − MEMIT, both at 558); the alignment effect at λ 2093 says whether it holds at the other λ."""
    at: dict[tuple[int, str, str, str], float] = {
        (c.n, c.blocks, c.method, c.lam): c.get("efficacy_strict") for c in cells
    }
    head = [
        "N",
        "blocks",
        "MEMIT λ 2093",
        "gated λ 558",
        "gap",
        "= λ effect",
        "+ alignment at 558",
        "alignment at 2093",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for n, blocks in sorted({(c.n, c.blocks) for c in cells}, key=lambda k: (k[0], k[1] != "3–4")):
        memit_hi, memit_lo, gated_lo, gated_hi = (
            at.get((n, blocks, m, lam), math.nan)
            for m, lam in (("memit", "2093.0"), ("memit", "558.1"), ("gated", "558.1"), ("gated", "2093.0"))
        )
        values = [gated_lo - memit_hi, memit_lo - memit_hi, gated_lo - memit_lo, gated_hi - memit_hi]
        lines.append(
            f"| {n} | {blocks} | {memit_hi:.3f} | {gated_lo:.3f} | "
            + " | ".join(f"{v:+.3f}" for v in values)
            + " |"
        )
    return "\n".join(lines)


def _by_cell(cells: Iterable[Cell]) -> dict[tuple[int, str, str, str], Cell]:
    return {(c.n, c.method, c.blocks, c.lam): c for c in cells}


def forecasts(cells: list[Cell], capacity: dict[int, dict[str, Any]]) -> str:
    """Per N and λ the capacity report holds (λ 2093 and its ``lambda_for`` pick): its forecast mean
    leverage per block (keys at the bare prompts of the unedited model, before any residual), the solve's
    own mean leverage in the MEMIT cells (two blocks; block 4 alone), and the strict efficacy that followed
    (MEMIT / gated EAMET)."""
    by_key = _by_cell(cells)
    head = [
        "N",
        "λ",
        "forecast, blocks 3 / 4",
        "solve, blocks 3–4",
        "solve, block 4 alone",
        "eff S blocks 3–4 (MEMIT / gated)",
        "eff S block 4 (MEMIT / gated)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|---|---|---|---|"]

    def solved(n: int, blocks: str, lam: str) -> str:
        cell = by_key.get((n, "memit", blocks, lam))
        return " / ".join(f"{x:.2f}" for x in cell.leverage) if cell else ""

    def efficacy(n: int, blocks: str, lam: str) -> str:
        got = [by_key.get((n, m, blocks, lam)) for m in ("memit", "gated")]
        return " / ".join(f"{c.get('efficacy_strict'):.3f}" if c else "—" for c in got)

    for n in sorted(capacity):
        report = capacity[n]
        rows = [(report["blocks"], "2093.0")]
        pick = report.get("lambda_for", {}).get("report")
        if pick:
            rows.append((pick["blocks"], "cap"))
        for blocks, lam in rows:
            ordered = sorted(blocks, key=lambda b: b["layer"])
            lam_text = " / ".join(f"{b['lambda']:.0f}" for b in ordered)
            forecast = " / ".join(f"{b['mean_leverage']:.2f}" for b in ordered)
            lines.append(
                f"| {n} | {lam_text} | {forecast} | {solved(n, '3–4', lam)} | {solved(n, '4', lam)} | "
                f"{efficacy(n, '3–4', lam)} | {efficacy(n, '4', lam)} |"
            )
    return "\n".join(lines)


def _evaluated(case: dict[str, Any], *, failed: bool = False) -> set[int]:
    """The facts of a ``per_case`` record that were evaluated (or only those that failed strict efficacy)."""
    return {
        i
        for i, e in zip(case["index"], case["efficacy_strict"], strict=True)
        if e is not None and (not failed or e < 1)
    }


def overlap(cells: list[Cell]) -> str:
    """Per matched pair of cells (same N, blocks, λ) with ``per_case`` records: which facts MEMIT and the
    gated EAMET fail (strict efficacy), which the alignment rescues (MEMIT fails, gated lands) and which it
    loses, with the median misalignment score A(i) of MEMIT's residuals in each group — whether aligning
    fixes the facts the misalignment flags."""
    import statistics

    by_key = _by_cell(cells)
    head = ["N", "blocks", "λ", "MEMIT fails", "gated fails", "both", "rescued", "lost"]
    head.append("MEMIT's A(i): rescued / lost / both fail / both land")
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    in_order = sorted(cells, key=lambda c: (c.n, _order(c.curve)))
    for n, blocks, lam in dict.fromkeys((c.n, c.blocks, c.lam) for c in in_order):
        pair = (by_key.get((n, m, blocks, lam)) for m in ("memit", "gated"))
        memit, gated = (c.row.get("per_case") if c else None for c in pair)
        if not (memit and gated) or memit["index"] != gated["index"]:
            continue
        score = dict(zip(memit["index"], memit["misalignment"], strict=True))
        fm, fg = _evaluated(memit, failed=True), _evaluated(gated, failed=True)
        groups = (fm - fg, fg - fm, fm & fg, _evaluated(memit) - fm - fg)
        medians = " / ".join(f"{statistics.median(score[i] for i in g):.2f}" if g else "—" for g in groups)
        lines.append(
            f"| {n} | {blocks} | {LAMBDAS[lam]} | {len(fm)} | {len(fg)} | {len(fm & fg)} | {len(fm - fg)} | "
            f"{len(fg - fm)} | {medians} |"
        )
    return "\n".join(lines)


def auc(scores: Sequence[float], failed: Sequence[bool]) -> float:
    """The chance that a failed fact scores above a landed one (ties count half): 0.5 is no information, 1 a
    perfect predictor of failure. NaN when every fact failed or none did."""
    import numpy as np

    x = np.asarray(scores, dtype=np.float64)
    bad = np.asarray(failed, dtype=bool)
    if bad.all() or not bad.any():
        return math.nan
    hi, lo = x[bad][:, None], x[~bad][None, :]
    return float(((hi > lo).sum() + 0.5 * (hi == lo).sum()) / (hi.size * lo.size))


def case_record_of_edit(path: Path) -> dict[str, Any]:
    """An eamet edit file (``eamet edit --out``, e.g. a residual pass's) as a ``per_case`` record of all its
    facts (bench_real's ``fact_signals``, at full precision), a fact failing when it did not land (the
    edit's own strict check at the bare prompt)."""
    import sys

    from eamet.edit.results import EditResult

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benches/, where bench_real lives
    from bench_real import fact_signals

    result = EditResult.load(path)
    if not result.outcomes:
        raise SystemExit(f"{path}: the edit recorded no outcomes (edited with check_landed off?)")
    record = fact_signals(result, range(len(result.outcomes)), digits=None)
    return {**record, "efficacy_strict": [float(o.landed) for o in result.outcomes]}


PREDICTORS = ("misalignment A(i)", "1 − leverage", "fit error", "residual NLL")


def predictor_aucs(case: dict[str, Any]) -> tuple[int, int, list[float]]:
    """How many of a ``per_case`` record's evaluated facts failed, of how many, and the AUC of each of
    :data:`PREDICTORS` for those failures (NaN where the record lacks it): the fact's misalignment score,
    its leverage (lower: more of its residual left unrealised; the smallest over the blocks), its fit error
    (the largest over the blocks) and the residual step's final NLL (the residual never made the edit)."""
    kept = [i for i, e in enumerate(case["efficacy_strict"]) if e is not None]
    failed = [case["efficacy_strict"][i] < 1.0 for i in kept]

    def over_blocks(key: str, pick: Any) -> list[float] | None:
        by_block = case.get(key) or {}
        return [pick(values) for values in zip(*by_block.values(), strict=True)] if by_block else None

    scores = [
        case.get("misalignment"),
        [1.0 - x for x in over_blocks("leverage", min) or []] or None,
        over_blocks("fit_error", max),
        case.get("residual_nll"),
    ]
    aucs = [auc([s[i] for i in kept], failed) if s else math.nan for s in scores]
    return sum(failed), len(failed), aucs


def predictors(cells: list[Cell], edits: Sequence[Path] = ()) -> str:
    """Per cell that kept its ``per_case`` record, and per edit file in ``edits``: how well each of
    :data:`PREDICTORS` tells which facts failed strict efficacy, as an AUC (the chance that a failed fact
    scores above a landed one: 0.5 is no information, 1 a perfect predictor)."""
    head = ["N", "edit", "failed", *(f"AUC {p}" for p in PREDICTORS)]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|---:|" + "---:|" * len(PREDICTORS)]
    rows = [
        (c.n, f"{METHODS[c.method]}, blocks {c.blocks}, {LAMBDAS[c.lam]}", c.row["per_case"])
        for c in sorted(cells, key=lambda c: (c.n, _order(c.curve)))
        if c.row.get("per_case")
    ]
    for path in edits:
        case = case_record_of_edit(path)
        rows.append((len(case["index"]), f"{path.stem} (edit file: landed or not)", case))
    for n, name, case in rows:
        failed, total, aucs = predictor_aucs(case)
        shown = ("—" if math.isnan(v) else f"{v:.2f}" for v in aucs)  # a record from before that signal
        lines.append(f"| {n} | {name} | {failed}/{total} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _label(method: str, blocks: str) -> str:
    return f"{METHODS[method]}, block{'s' if blocks == '3–4' else ''} {blocks}"


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(cells: list[Cell], folder: Path) -> list[Path]:
    """efficacy.png (strict efficacy against N, one panel per λ), misalignment.png (against N, per
    method) and leverage.png (the solve's mean leverage, the capacity report's forecast, against the
    strict efficacy that followed, every cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    groups = curves(cells)

    fig, axes = plt.subplots(1, len(LAMBDAS), figsize=(15, 4), sharey=True)
    for ax, (lam, lam_text) in zip(axes, LAMBDAS.items(), strict=True):
        for (method, blocks, cell_lam), group in sorted(groups.items(), key=lambda kv: _order(kv[0])):
            if cell_lam != lam:
                continue
            ax.plot(
                [c.n for c in group],
                [c.get("efficacy_strict") for c in group],
                "-" if blocks == "3–4" else "--",
                color=COLORS[method],
                marker="o",
                markersize=3,
                label=_label(method, blocks),
            )
        ax.axhline(THRESHOLD, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("edits N")
        ax.set_title(f"strict efficacy, {lam_text}")
    axes[0].set_ylabel("strict efficacy")
    axes[-1].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, CounterFact (benches/verdict)", fontsize=10)
    written.append(_save(fig, folder / "efficacy.png"))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in METHODS:
        # The misalignment is the residuals' against the keys: the same for every λ and block choice.
        by_n = {c.n: c.get("misalignment_total") for c in cells if c.method == method}
        if by_n:
            ns = sorted(by_n)
            ax.plot(ns, [by_n[n] for n in ns], color=COLORS[method], marker="o", label=METHODS[method])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("edits N")
    ax.set_title("misalignment total of the residuals")
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / "misalignment.png"))

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in METHODS:
        for blocks, marker in (("3–4", "o"), ("4", "^")):
            pts = [
                (sum(c.leverage) / len(c.leverage), c.get("efficacy_strict"))
                for c in cells
                if c.method == method and c.blocks == blocks and c.leverage
            ]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True),
                    color=COLORS[method],
                    marker=marker,
                    s=18,
                    label=_label(method, blocks),
                )
    ax.set_xlabel("mean leverage of the solve (capacity report's forecast)")
    ax.set_ylabel("strict efficacy")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.03, 1.03)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)
    ax.set_title("forecast against outcome, every cell")
    written.append(_save(fig, folder / "leverage.png"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where cells.sh wrote cells-N.json and capacity-N.json")
    parser.add_argument("--markdown", action="store_true", help="print one table per N")
    parser.add_argument("--crossings", action="store_true", help="print where each curve falls below 50 %%")
    parser.add_argument("--gaps", action="store_true", help="print the gap split into λ and alignment")
    parser.add_argument("--predictors", action="store_true", help="print what predicts the failed facts")
    parser.add_argument(
        "--forecast", action="store_true", help="print the capacity report's leverage beside the solve's"
    )
    parser.add_argument(
        "--overlap", action="store_true", help="print which facts the alignment rescues and which it loses"
    )
    parser.add_argument(
        "--edit-file",
        type=Path,
        action="append",
        default=[],
        help="with --predictors: an eamet edit file (e.g. a residual pass's) to add, every fact of it",
    )
    parser.add_argument("--plot", type=Path, help="write efficacy.png, misalignment.png, leverage.png here")
    args = parser.parse_args()
    cells, before, capacity = load(args.folder)
    if args.markdown:
        print(markdown(cells, before, capacity))
    if args.crossings:
        print(crossings(cells))
    if args.gaps:
        print(gaps(cells))
    if args.predictors:
        print(predictors(cells, args.edit_file))
    if args.forecast:
        print(forecasts(cells, capacity))
    if args.overlap:
        print(overlap(cells))
    if args.plot:
        for path in plot(cells, args.plot):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
