"""The embedding-misalignment diagnostic of EAMET (arXiv 2505.11876), model-free and torch-free.

For N facts with keys k_i (inputs of the edited MLP projection) and residuals r_i (how its output must
move), define for each fact i and its support J_i (all j != i, or only j < i when ``progressive``):

    P_k(i) = softmax_{j in J_i}(cos(k_i, k_j) / tau)      P_r(i) = softmax_{j in J_i}(cos(r_i, r_j) / tau)
    A(i)   = KL(P_r(i) || P_k(i))

A large A(i) means fact i's residual sits among different neighbours than its key, which the paper
links to reconstruction error after the least-squares solve. The work is done by the Rust core in
tiles, so 100k facts need memory proportional to N, not N².
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eamet import _core
from eamet.base.errors import ParameterError
from eamet.base.plotting import figure_class
from eamet.base.progress import progress_callback
from eamet.kernels.arrays import as_float_matrix

__all__ = [
    "DEFAULT_TAU",
    "DEFAULT_TOP_M",
    "MisalignmentReport",
    "kernel_threads",
    "misalignment",
    "neighbors",
]

DEFAULT_TAU = 0.07
"""Softmax temperature of the EAMET paper and reference code."""
DEFAULT_TOP_M = 50
"""Neighbours per fact in EAMET's top-M MSE (hard-coded in the reference code)."""
AUTO_PROGRESS_ROWS = 20_000
"""With ``progress=None``, a bar is shown from this many rows on."""

_QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
_TOP_M_CAP = 2**62


@dataclass(frozen=True, eq=False)
class MisalignmentReport:
    """Per-fact misalignment of keys vs residuals, as computed by :func:`misalignment`.

    Attributes:
        scores: (N,) float64, A(i) = KL(P_r(i) || P_k(i)), the paper's direction; 0 for an empty support.
        reverse_scores: (N,) float64, KL(P_k(i) || P_r(i)), the direction EAMET's alignment loss
            minimises (key distribution as the target).
        overlap: (N,) float64, |topM_r(i) ∩ topM_k(i)| / min(M, |J_i|); 1 for an empty support.
        topm_mse: (N,) float64, sum over j in topM_k(i) of w_j (cos_k - cos_r)², w = softmax(cos_k/tau)
            over those neighbours; 0 for an empty support.
        key_neighbors: (N, M) int64, top-M key-space neighbours by cosine, best first, self excluded,
            ties to the smaller index; -1 where the support is smaller than M.
        neighbor_key_cos: (N, M) float32, key cosine to each key neighbour (NaN in padding).
        neighbor_residual_cos: (N, M) float32, residual cosine to each key neighbour (NaN in padding).
        top_m: effective M = min(requested top_m, N - 1).
        tau: the softmax temperature used.
        progressive: whether the support was j < i (True) or j != i (False).
    """

    scores: np.ndarray
    reverse_scores: np.ndarray
    overlap: np.ndarray
    topm_mse: np.ndarray
    key_neighbors: np.ndarray
    neighbor_key_cos: np.ndarray
    neighbor_residual_cos: np.ndarray
    top_m: int
    tau: float
    progressive: bool

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def total(self) -> float:
        """Sum of A(i) over all facts: the paper's "total misalignment"."""
        return float(self.scores.sum())

    @property
    def mean(self) -> float:
        """Mean of A(i) over all facts."""
        return float(self.scores.mean())

    def quantiles(self, qs: tuple[float, ...] = _QUANTILES) -> dict[str, float]:
        """Quantiles of A(i), keyed ``"p0"``, ``"p25"``, ..., ``"p100"``."""
        values = np.quantile(self.scores, qs)
        return {f"p{_percent(q)}": float(v) for q, v in zip(qs, values, strict=True)}

    def worst(self, k: int = 10) -> list[int]:
        """Indices of the ``k`` facts with the largest A(i), largest first (ties: smaller index)."""
        if k < 0:
            raise ParameterError(f"k: must be >= 0, got {k}", argument="k")
        order = np.lexsort((np.arange(len(self)), -self.scores))
        return [int(i) for i in order[:k]]

    def summary(self) -> dict[str, Any]:
        """Scalars only: sizes, settings, total, mean, quantiles and means of overlap and MSE."""
        return {
            "n": len(self),
            "top_m": self.top_m,
            "tau": self.tau,
            "progressive": self.progressive,
            "total": self.total,
            "mean": self.mean,
            "quantiles": self.quantiles(),
            "reverse_total": float(self.reverse_scores.sum()),
            "overlap_mean": float(self.overlap.mean()),
            "topm_mse_mean": float(self.topm_mse.mean()),
        }

    def to_dict(self, *, worst: int = 10) -> dict[str, Any]:
        """JSON-ready dict: :meth:`summary`, the ``worst`` rows, and the per-fact arrays as lists.

        The (N, M) neighbour matrices are left out (they can be large); read them from the attributes.
        """
        out = self.summary()
        out["worst"] = self.worst(worst)
        for name in ("scores", "reverse_scores", "overlap", "topm_mse"):
            out[name] = getattr(self, name).tolist()
        return out

    def plot(self, path: str | Path, *, rows: int = 4) -> Path:
        """Draws the distribution of A(i), overlap vs A(i), and key-vs-residual cosines of the
        ``rows`` worst facts' key neighbours into one PNG/PDF/SVG at ``path``. Needs ``eamet[plot]``.
        """

        return _plot_report(self, Path(path), rows=rows)


def _percent(q: float) -> str:
    p = q * 100
    return str(int(p)) if float(p).is_integer() else f"{p:g}"


# The two converters below check types only; the core checks the ranges (tau finite and > 0, top_m
# >= 1) and raises the same ParameterError naming the argument.


def _as_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise ParameterError(f"tau: must be a real number, got {tau!r}", argument="tau")
    return float(tau)


def _as_top_m(top_m: Any) -> int:
    if isinstance(top_m, bool) or not isinstance(top_m, numbers.Integral):
        raise ParameterError(f"top_m: must be an integer, got {top_m!r}", argument="top_m")
    # The core clamps to N - 1; clamping here first keeps arbitrarily large ints within its int range.
    return min(int(top_m), _TOP_M_CAP)


def _show_progress(progress: bool | None, rows: int) -> bool:
    return rows >= AUTO_PROGRESS_ROWS if progress is None else bool(progress)


def misalignment(
    keys: Any,
    residuals: Any,
    *,
    tau: float = DEFAULT_TAU,
    top_m: int = DEFAULT_TOP_M,
    progressive: bool = False,
    progress: bool | None = None,
) -> MisalignmentReport:
    """Scores how far each fact's residual neighbourhood departs from its key neighbourhood.

    Args:
        keys: (N, d_k) keys, numpy array or torch tensor (any device, float dtype and strides).
        residuals: (N, d_r) residuals, row i belonging to key i; d_r may differ from d_k.
        tau: softmax temperature (> 0).
        top_m: neighbours per fact for the overlap, MSE and neighbour lists (>= 1; clamped to N - 1,
            and per row to the size of its support).
        progressive: support j < i (the view of EAMET's progressive optimisation) instead of j != i.
        progress: show a progress bar; ``None`` shows one from 20,000 rows on.

    Returns:
        A :class:`MisalignmentReport`.

    Raises:
        ShapeError: not 2-D, different N, or N < 2.  EmptyError: an empty array.
        DTypeError: non-float values.  NonFiniteError / ZeroNormError: names the first bad row.
        ParameterError: ``tau`` or ``top_m`` out of range.
    """
    tau_value = _as_tau(tau)
    m = _as_top_m(top_m)
    k = as_float_matrix(keys, "keys")
    r = as_float_matrix(residuals, "residuals")
    show = _show_progress(progress, k.shape[0] if k.ndim else 0)
    with progress_callback(show, "misalignment") as callback:
        raw = _core.misalignment(
            k, r, tau=tau_value, top_m=m, progressive=bool(progressive), progress=callback
        )
    return MisalignmentReport(
        scores=raw["scores"],
        reverse_scores=raw["reverse_scores"],
        overlap=raw["overlap"],
        topm_mse=raw["topm_mse"],
        key_neighbors=raw["key_neighbors"],
        neighbor_key_cos=raw["neighbor_key_cos"],
        neighbor_residual_cos=raw["neighbor_residual_cos"],
        top_m=int(raw["top_m"]),
        tau=tau_value,
        progressive=bool(progressive),
    )


def neighbors(
    x: Any, top_m: int, *, progressive: bool = False, progress: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``top_m`` most cosine-similar other rows (only earlier rows when ``progressive``).

    Args:
        x: (N, d) numpy array or torch tensor, N >= 2.
        top_m: neighbours per row (>= 1; clamped to N - 1).
        progressive: row i's candidates are the rows j < i (as in :func:`misalignment`) instead of
            every j != i; row i then has min(M, i) neighbours and row 0 none.
        progress: show a progress bar; ``None`` shows one from 20,000 rows on.

    Returns:
        ``(indices, sims)``: (N, M) int64 neighbour indices, best first (ties: smaller index), and
        (N, M) float32 cosine similarities, with M = min(top_m, N - 1). Self is never included. Slots
        beyond a row's candidates (only with ``progressive``) hold index -1 and similarity NaN.

    Raises:
        The errors of :func:`misalignment`, naming ``x``.
    """
    m = _as_top_m(top_m)
    a = as_float_matrix(x, "x")
    with progress_callback(_show_progress(progress, a.shape[0] if a.ndim else 0), "neighbors") as cb:
        return _core.neighbors(a, m, progressive=bool(progressive), progress=cb)


@contextmanager
def kernel_threads(n: int | None) -> Iterator[None]:
    """Runs the ``with`` block with the Rust kernels on ``n`` threads, then restores the previous count.

    Args:
        n: kernel threads inside the block (0: the default, ``EAMET_NUM_THREADS`` or every CPU);
            ``None`` leaves the count as it is.

    Raises:
        ParameterError: ``n`` negative.

    Example:
        >>> with kernel_threads(1):
        ...     report = misalignment(np.eye(3) + 1, np.eye(3) + 1)
    """
    before = _core.get_num_threads()
    if n is not None:
        _core.set_num_threads(n)
    try:
        yield
    finally:
        _core.set_num_threads(before)


def _plot_report(report: MisalignmentReport, path: Path, *, rows: int = 4) -> Path:
    """Writes three panels to ``path`` and returns it.

    (a) the distribution of A(i) with its total and mean; (b) top-M overlap against A(i), one point per
    fact; (c) for the ``rows`` worst facts, key cosine vs residual cosine over each one's top-M key
    neighbours — an aligned fact lies on the diagonal.
    """
    figure = figure_class()
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
