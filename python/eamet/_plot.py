"""Figures of reports (matplotlib, object API, no pyplot state): a
:class:`~eamet.diagnostics.MisalignmentReport`, a :class:`~eamet.tracing.TraceReport` and a
:class:`~eamet.capacity.CapacityReport`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eamet.errors import MissingDependencyError

if TYPE_CHECKING:
    from eamet.capacity import CapacityReport
    from eamet.diagnostics import MisalignmentReport
    from eamet.tracing import TraceReport

__all__ = ["plot_capacity", "plot_report", "plot_trace"]


def _figure_class() -> Any:
    """matplotlib's ``Figure``, or ``MissingDependencyError`` saying what to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "plotting needs matplotlib: pip install 'eamet[plot]'", argument="plot"
        ) from exc
    return Figure


def plot_report(report: MisalignmentReport, path: Path, *, rows: int = 4) -> Path:
    """Writes three panels to ``path`` and returns it.

    (a) the distribution of A(i) with its total and mean; (b) top-M overlap against A(i), one point per
    fact; (c) for the ``rows`` worst facts, key cosine vs residual cosine over each one's top-M key
    neighbours — an aligned fact lies on the diagonal.
    """
    figure = _figure_class()
    fig = figure(figsize=(15, 4.6), layout="constrained")
    ax_hist, ax_overlap, ax_rows = fig.subplots(1, 3)
    scores = report.scores
    support = "j < i" if report.progressive else "j ≠ i"
    fig.suptitle(
        f"Embedding misalignment: N = {len(report)}, τ = {report.tau:g}, "
        f"M = {report.top_m}, support {support}"
    )

    positive = scores[scores > 0]
    bins = (
        np.geomspace(positive.min(), positive.max(), 50)
        if positive.size > 1 and positive.max() > positive.min()
        else 50
    )
    ax_hist.hist(positive if positive.size else scores, bins=bins, color="#4477aa")
    if isinstance(bins, np.ndarray):
        ax_hist.set_xscale("log")
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("A(i) = KL(P_r(i) ‖ P_k(i))")
    ax_hist.set_ylabel("facts")
    ax_hist.set_title(f"(a) total {report.total:.4g}, mean {report.mean:.4g}")

    ax_overlap.scatter(scores, report.overlap, s=4, alpha=0.35, color="#cc6677", linewidths=0)
    ax_overlap.set_xscale("symlog", linthresh=max(float(np.median(scores)), 1e-6))
    ax_overlap.set_ylim(-0.03, 1.03)
    ax_overlap.set_xlabel("A(i)")
    ax_overlap.set_ylabel(f"top-{report.top_m} overlap of key and residual neighbours")
    ax_overlap.set_title("(b) neighbourhood overlap vs misalignment")

    worst = report.worst(rows)
    shown = [
        (i, report.neighbor_key_cos[i][valid], report.neighbor_residual_cos[i][valid])
        for i in worst
        for valid in [report.key_neighbors[i] >= 0]
    ]
    values = np.concatenate([np.concatenate([x, y]) for _, x, y in shown]) if shown else np.zeros(1)
    lo, hi = float(values.min()) - 0.05, float(values.max()) + 0.05
    ax_rows.plot([lo, hi], [lo, hi], color="0.6", linewidth=1, linestyle="--", label="aligned (y = x)")
    for i, key_cos, residual_cos in shown:
        ax_rows.scatter(key_cos, residual_cos, s=10, alpha=0.8, label=f"fact {i}: A = {scores[i]:.3g}")
    ax_rows.set_xlim(lo, hi)
    ax_rows.set_ylim(lo, hi)
    ax_rows.set_xlabel("key cosine to key neighbour")
    ax_rows.set_ylabel("residual cosine to the same neighbour")
    ax_rows.set_title(f"(c) the {rows} worst facts' top-{report.top_m} key neighbours")
    ax_rows.legend(fontsize="small", loc="best")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_trace(report: TraceReport, path: Path) -> Path:
    """Writes two panels to ``path`` and returns it: (a) mean P(true object) with each kind's clean state
    restored at block l, between the clean and corrupted baselines (dashed); (b) the indirect effect
    (restored − corrupted) per block, with the 25–75 % range over records shaded.
    """
    figure = _figure_class()
    fig = figure(figsize=(11, 4.2), layout="constrained")
    ax_prob, ax_effect = fig.subplots(1, 2)
    s = report.settings
    window = f", MLP window {s['window']}" if "mlp" in report.kinds else ""
    fig.suptitle(
        f"Causal trace at the subject's last token: {report.n_records} records, {s['samples']} samples, "
        f"ν = {s['noise']:.3g}{window}"
    )
    blocks = np.arange(report.num_blocks)
    colors = {"block": "#4477aa", "mlp": "#228833"}
    ax_prob.axhline(report.clean, color="0.3", linestyle="--", linewidth=1, label="clean")
    ax_prob.axhline(report.corrupted, color="#cc6677", linestyle="--", linewidth=1, label="corrupted")
    for kind in report.kinds:
        ax_prob.plot(
            blocks, report.restored[kind], marker="o", color=colors.get(kind), label=f"{kind} restored"
        )
        effects = np.array(
            [[r["restored"][kind][b] - r["corrupted"] for b in blocks] for r in report.per_record]
        )
        low, high = np.percentile(effects, [25, 75], axis=0)
        ax_effect.fill_between(blocks, low, high, color=colors.get(kind), alpha=0.2, linewidth=0)
        ax_effect.plot(blocks, report.indirect_effect(kind), marker="o", color=colors.get(kind), label=kind)
    ax_prob.set_ylim(-0.02, 1.02)
    ax_prob.set_xlabel("block")
    ax_prob.set_ylabel("P(true object's first token)")
    ax_prob.set_title("(a) probability with the clean state restored")
    ax_prob.legend(fontsize="small", loc="best")
    ax_effect.axhline(0.0, color="0.6", linewidth=1)
    ax_effect.set_xlabel("block")
    ax_effect.set_ylabel("indirect effect (restored − corrupted)")
    ax_effect.set_title("(b) mean indirect effect, 25–75 % of records shaded")
    ax_effect.legend(fontsize="small", loc="best")
    for ax in (ax_prob, ax_effect):
        ax.set_xticks(blocks)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_capacity(report: CapacityReport, path: Path) -> Path:
    """Writes one row of three panels per block to ``path`` and returns it: (a) the distribution of the
    leverage h_i with its mean; (b) the mean leverage tr(H)/N against λ on a log axis, the block's λ
    marked (absent for a report read from an edit, which keeps no spectrum); (c) each fact's leverage
    against its top-1 key cosine (crowded facts sit right).
    """
    figure = _figure_class()

    rows = len(report.blocks)
    fig = figure(figsize=(15, 4.2 * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, 3, squeeze=False))
    fig.suptitle(
        f"Capacity of {report.facts} facts ({report.method}): leverage h_i = k_iᵀ(λC + KᵀK)⁻¹k_i per block"
    )
    for (ax_hist, ax_curve, ax_cos), block in zip(axes, report.blocks, strict=True):
        mean = block.mean_leverage
        ax_hist.hist(block.leverage, bins=np.linspace(0.0, 1.0, 41), color="#4477aa")
        ax_hist.axvline(mean, color="#cc6677", linewidth=1.5, label=f"mean {mean:.3f}")
        ax_hist.set_xlim(0, 1)
        ax_hist.set_xlabel("leverage h_i")
        ax_hist.set_ylabel("facts")
        ax_hist.set_title(
            f"(a) block {block.layer}, λ = {block.lam:.4g}: tr(H) = {block.trace:.1f} of N = {block.n}"
        )
        ax_hist.legend(fontsize="small", loc="best")

        if block.source == "edit":
            ax_curve.text(0.5, 0.5, "read from an edit:\nno spectrum to vary λ", ha="center", va="center")
            ax_curve.set_axis_off()
        else:
            ref = block.lam if block.lam > 0 else 1.0
            lams = np.geomspace(ref * 1e-3, ref * 1e3, 61)
            ax_curve.plot(lams, [block.mean_leverage_at(float(x)) for x in lams], color="#4477aa")
            if block.lam > 0:
                ax_curve.axvline(block.lam, color="0.6", linestyle="--", linewidth=1)
                ax_curve.plot([block.lam], [mean], "o", color="#cc6677", label=f"λ = {block.lam:.4g}")
                ax_curve.legend(fontsize="small", loc="best")
            ax_curve.set_xscale("log")
            ax_curve.set_ylim(-0.02, 1.02)
            ax_curve.set_xlabel("λ")
            ax_curve.set_ylabel("mean leverage tr(H)/N")
            ax_curve.set_title(f"(b) block {block.layer}: mean leverage against λ ({block.source})")

        if block.top_cos.shape[1]:
            ax_cos.scatter(
                block.top_cos[:, 0], block.leverage, s=10, alpha=0.5, color="#228833", linewidths=0
            )
            ax_cos.set_xlabel("cosine to the nearest other key")
            ax_cos.set_ylabel("leverage h_i")
            ax_cos.set_ylim(-0.02, 1.02)
            ax_cos.set_title(f"(c) block {block.layer}: leverage against crowding")
        else:
            ax_cos.text(0.5, 0.5, "no key cosines", ha="center", va="center")
            ax_cos.set_axis_off()

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
