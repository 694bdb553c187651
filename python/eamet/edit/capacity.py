"""The capacity report: how much of each fact's residual the update can realise, before any residual is
optimised.

The update of a block solves Δ(λC + KᵀK) = RKᵀ for N keys k_i (rows of K, N × d_ff) and residual shares
r_i. It moves key k_j's output by Δk_j = Σ_i r_i h_ij with H = K(λC + KᵀK)⁻¹Kᵀ, so a fact alone (r_j = 0
for j ≠ i) gets the share

    h_i = k_iᵀ (λC + KᵀK)⁻¹ k_i          (its *leverage*, in [0, 1])

of its residual, whatever that residual is. tr(H) = Σ h_i is the effective number of directions the
solve fits (at most min(N, d_ff)); tr(H)/N is the mean leverage. Both need only the keys (one forward
per fact) and C, so they can be read before the residual step, which is nearly all of an edit's time.
How crowded key space is — each fact's top-M key cosines, from the Rust core — says which facts share
their directions with others.

The leverage at any other λ is cheap: with C = LLᵀ (Cholesky) and K̃ = KL⁻ᵀ = USVᵀ (thin SVD),

    h_i(λ) = Σ_j U_ij² s_j² / (λ + s_j²)        tr(H)(λ) = Σ_j s_j² / (λ + s_j²)

at O(N·r) per λ (r = rank K̃). :meth:`CapacityReport.lambda_for` uses it to offer a λ (eamet's own
rule, never the reference's default).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from eamet.base.errors import NonFiniteError, ParameterError, ShapeError, SolveError
from eamet.base.plotting import figure_class
from eamet.edit.solve import solve_layer
from eamet.kernels.diagnostics import neighbors
from eamet.model.device import solve_device

if TYPE_CHECKING:
    from eamet.edit.results import EditResult

__all__ = ["BlockCapacity", "CapacityReport", "capacity_of"]

_SVD_AGREEMENT = 1e-8
"""Largest |h_i(svd) − h_i(solve)| at the block's own λ for the SVD path to be trusted at other λ."""
_PIVOT_FLOOR = 1e-12
"""C counts as positive definite for whitening when its smallest Cholesky pivot² ≥ this × its largest
diagonal entry; below that (a corpus of fewer tokens than d_ff, dead units) L⁻¹ would amplify noise."""
_BISECTION_RTOL = 1e-12
_BRACKET_STEP = 16.0
_BRACKET_RANGE = 1e40


class _Spectrum:
    """h_i(λ) = Σ_j u2[i, j] s2[j] / (λ + s2[j]) from the whitened keys' thin SVD.

    Attributes:
        u2: (N, r) float64, U_ij² (columns of U orthonormal, so each column sums to 1).
        s2: (r,) float64, s_j² > 0 (numerically zero singular values dropped).
    """

    name = "svd"

    def __init__(self, u2: np.ndarray, s2: np.ndarray) -> None:
        self.u2, self.s2 = u2, s2

    def _share(self, lam: float) -> np.ndarray:
        # s²/(λ + s²) for each direction; 1 at λ = 0 (s² > 0 here).
        return self.s2 / (lam + self.s2)

    def leverage(self, lam: float) -> np.ndarray:
        out: np.ndarray = self.u2 @ self._share(lam)
        return out

    def mean(self, lam: float) -> float:
        # Columns of U are orthonormal, so the mean leverage needs only the spectrum: tr(H)/N.
        return float(self._share(lam).sum()) / int(self.u2.shape[0])


class _Direct:
    """h_i(λ) by a float64 Cholesky solve of λC + KᵀK per λ (C not positive definite).

    Attributes:
        moment: (d_ff, d_ff) C; keys: (N, d_ff) K; layer: for error messages.
    """

    name = "solve"

    def __init__(self, moment: torch.Tensor, keys: torch.Tensor, layer: int) -> None:
        self.moment, self.keys, self.layer = moment, keys, layer

    def leverage(self, lam: float) -> np.ndarray:
        return _solved_leverage(self.moment, self.keys, lam, self.layer)

    def mean(self, lam: float) -> float:
        return float(self.leverage(lam).mean())


def _solved_leverage(moment: torch.Tensor, keys: torch.Tensor, lam: float, layer: int) -> np.ndarray:
    """(N,) float64: diag(K (λC + KᵀK)⁻¹ Kᵀ) by the edit's own solve (``SolveError`` where it fails)."""
    solved = solve_layer(moment, keys, lam, layer=layer)
    k = keys.to(device=solved.device, dtype=torch.float64)
    return np.asarray((solved * k).sum(dim=1).cpu().numpy(), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class BlockCapacity:
    """The capacity of one edited block for N facts.

    Attributes:
        layer: block index.
        lam: λ (``mom2_update_weight`` of the block) the leverage is for.
        leverage: (N,) float64, h_i = k_iᵀ(λC + KᵀK)⁻¹k_i: the share of fact i's residual the solve
            realises when no other fact asks anything (in [0, 1]).
        top_cos: (N, M) float32, cosine of each fact's key to its M most similar other keys, best first
            (``eamet.neighbors``; M = min(top_m, N − 1), so (1, 0) for one fact).
        source: how the leverage at other λ is computed: ``"svd"`` (whitened keys' thin SVD, O(N·r) per
            λ), ``"solve"`` (a Cholesky solve per λ: C was not positive definite, or the SVD did not
            reproduce the solve), or ``"edit"`` (read from an :class:`~eamet.edit.results.EditResult`: only
            this λ).
    """

    layer: int
    lam: float
    leverage: np.ndarray
    top_cos: np.ndarray
    source: str
    _curve: _Spectrum | _Direct | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        """N, the number of facts."""
        return int(self.leverage.shape[0])

    @property
    def trace(self) -> float:
        """tr(H) = Σ h_i: the effective number of directions the solve fits (≤ min(N, d_ff))."""
        return float(self.leverage.sum())

    @property
    def mean_leverage(self) -> float:
        """tr(H) / N."""
        return self.trace / self.n

    def leverage_at(self, lam: float) -> np.ndarray:
        """(N,) float64 leverage at another λ ≥ 0 (same keys and C).

        Raises:
            ParameterError: λ negative or not finite, or a block read from an edit (no spectrum kept)
                asked for a λ other than its own.
            SolveError: on the ``"solve"`` path, where λC + KᵀK is not positive definite.
        """
        lam = _check_lambda(lam, self.layer)
        if lam == self.lam:
            same: np.ndarray = self.leverage.copy()
            return same
        return self._need_curve().leverage(lam)

    def mean_leverage_at(self, lam: float) -> float:
        """tr(H)(λ) / N at λ ≥ 0 (O(r) on the ``"svd"`` path)."""
        lam = _check_lambda(lam, self.layer)
        if lam == self.lam:
            return self.mean_leverage
        return self._need_curve().mean(lam)

    def at(self, lam: float) -> BlockCapacity:
        """The same block at another λ: new leverage, same keys, cosines and spectrum."""
        lam = _check_lambda(lam, self.layer)
        return BlockCapacity(self.layer, lam, self.leverage_at(lam), self.top_cos, self.source, self._curve)

    def lambda_for(self, mean_leverage: float) -> float:
        """The largest λ whose mean leverage is still ≥ ``mean_leverage`` (eamet's own rule: see
        :meth:`CapacityReport.lambda_for`)."""
        target = _check_target(mean_leverage)
        curve = self._need_curve()
        if isinstance(curve, _Spectrum) and curve.mean(0.0) < target:
            raise ParameterError(
                f"block {self.layer}: no λ ≥ 0 reaches a mean leverage of {target:g} (at most "
                f"{curve.mean(0.0):.4g} = rank/N at λ = 0: more facts than key dimensions they span)",
                argument="mean_leverage",
            )
        return _largest_lambda(curve.mean, target, self.lam, self.layer)

    def summary(self) -> dict[str, Any]:
        """Scalars: layer, λ, source, mean/median/min leverage, trace and trace/N, and the mean top-1
        and top-M key cosines (``None`` for one fact)."""
        cos = self.top_cos
        return {
            "layer": self.layer,
            "lambda": self.lam,
            "source": self.source,
            "mean_leverage": self.mean_leverage,
            "median_leverage": float(np.median(self.leverage)),
            "min_leverage": float(self.leverage.min()),
            "trace": self.trace,
            "trace_per_fact": self.trace / self.n,
            "mean_top1_cos": float(cos[:, 0].mean()) if cos.shape[1] else None,
            "mean_topm_cos": float(cos.mean()) if cos.shape[1] else None,
        }

    def _need_curve(self) -> _Spectrum | _Direct:
        if self._curve is None:
            raise ParameterError(
                f"block {self.layer}: this capacity was read from an edit result, which keeps only the "
                f"leverage at its own λ ({self.lam:g}); use Editor.capacity(facts) for other λ",
                argument="lam",
            )
        return self._curve


def _largest_lambda(mean: Callable[[float], float], target: float, start: float, layer: int) -> float:
    """Bisection on log λ for the largest λ with mean(λ) ≥ target; mean is decreasing in λ."""
    ref = start if start > 0 else 1.0
    hi = ref
    try:
        while mean(hi) >= target:
            hi *= _BRACKET_STEP
            if hi > ref * _BRACKET_RANGE:
                raise SolveError(f"still ≥ {target:g} at λ = {hi:.3g}")
    except SolveError as exc:
        # Only where C is singular along the keys: their part in C's null space is fitted whatever λ.
        raise ParameterError(
            f"block {layer}: the mean leverage stays ≥ {target:g} as λ grows until the solve breaks down "
            f"(C is singular along the keys, so λ cannot reduce their fit): no largest λ ({exc})",
            argument="mean_leverage",
        ) from None
    lo = hi / _BRACKET_STEP
    try:
        while mean(lo) < target:
            lo /= _BRACKET_STEP
            if lo < ref / _BRACKET_RANGE:
                return 0.0  # the target is the supremum at λ → 0 (only the SVD path gets here)
    except SolveError as exc:
        raise ParameterError(
            f"block {layer}: no λ > 0 reaches a mean leverage of {target:g} before λC + KᵀK becomes "
            f"singular ({exc})",
            argument="mean_leverage",
        ) from None
    while hi > lo * (1 + _BISECTION_RTOL):
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi:  # no float left between them
            break
        if mean(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(eq=False)
class CapacityReport:
    """Per edited block, how much of each fact's residual the update can realise (see the module doc).

    Attributes:
        blocks: one :class:`BlockCapacity` per edited block, in the config's order.
        facts: N.
        method: ``"eamet"`` or ``"memit"`` (the config the keys were taken with).
        top_m: M asked for the key cosines (each block's ``top_cos`` has min(M, N − 1) columns).
    """

    blocks: list[BlockCapacity]
    facts: int
    method: str
    top_m: int

    @property
    def layers(self) -> list[int]:
        """The blocks' indices."""
        return [b.layer for b in self.blocks]

    @property
    def lambdas(self) -> tuple[float, ...]:
        """Each block's λ."""
        return tuple(b.lam for b in self.blocks)

    def summary(self) -> dict[str, Any]:
        """Scalars for printing or JSON: ``{"facts", "method", "top_m", "blocks"}``, one
        :meth:`BlockCapacity.summary` per block."""
        return {
            "facts": self.facts,
            "method": self.method,
            "top_m": self.top_m,
            "blocks": [b.summary() for b in self.blocks],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: :meth:`summary` plus, per block, the (N,) leverage and each fact's top-1 key cosine
        as lists (the (N, M) cosines are left out; read ``top_cos``)."""
        out = self.summary()
        for row, block in zip(out["blocks"], self.blocks, strict=True):
            row["leverage"] = block.leverage.tolist()
            row["top1_cos"] = block.top_cos[:, 0].tolist() if block.top_cos.shape[1] else []
        return out

    def table(self) -> str:
        """Plain text: two lines of legend, the column names, then one line per block."""
        m = min(self.top_m, self.facts - 1)
        lines = [
            f"capacity of {self.facts} facts ({self.method}): leverage h_i = k_iᵀ(λC + KᵀK)⁻¹k_i, "
            "tr(H) = Σ h_i",
            f"top-1 / top-M cos: mean key cosine to the nearest / the M = {m} nearest other keys",
            f"{'block':>5}  {'λ':>10}  {'mean h':>7}  {'median h':>8}  {'min h':>7}  {'tr(H)':>9}  "
            f"{'tr(H)/N':>7}  {'top-1 cos':>9}  {'top-M cos':>9}",
        ]
        for b in self.blocks:
            s = b.summary()
            cos = (
                f"{s['mean_top1_cos']:>9.4f}  {s['mean_topm_cos']:>9.4f}"
                if s["mean_top1_cos"] is not None
                else f"{'—':>9}  {'—':>9}"
            )
            lines.append(
                f"{b.layer:>5}  {b.lam:>10.5g}  {s['mean_leverage']:>7.4f}  {s['median_leverage']:>8.4f}  "
                f"{s['min_leverage']:>7.4f}  {s['trace']:>9.2f}  {s['trace_per_fact']:>7.4f}  {cos}"
            )
        return "\n".join(lines)

    def at(self, lambdas: float | Sequence[float]) -> CapacityReport:
        """The same keys at other λ: one number for every block, or one per block (in ``blocks`` order).

        Raises:
            ParameterError: a λ negative or not finite, the wrong number of them, or a report read from
                an edit result (which keeps no spectrum).
        """
        values = self._per_block(lambdas, "lambdas")
        blocks = [b.at(lam) for b, lam in zip(self.blocks, values, strict=True)]
        return CapacityReport(blocks, self.facts, self.method, self.top_m)

    def lambda_for(self, mean_leverage: float) -> tuple[float, ...]:
        """Per block, the largest λ whose mean leverage (tr(H)/N) is still ≥ ``mean_leverage``.

        **eamet's own rule, not the reference's**: the reference (and every preset) takes λ from its
        hparams (``mom2_update_weight``); this is an offer to read, never a default. A larger λ keeps
        the update closer to the model's own key statistics C (less collateral change); a smaller one
        realises more of each residual. Found by bisection on log λ over the cheap formula (relative
        precision 1e-12); blocks on the ``"solve"`` path take one Cholesky solve per step.

        Returns:
            One λ per block, in ``blocks`` order.

        Raises:
            ParameterError: a target outside (0, 1), one no λ ≥ 0 reaches (more facts than the key
                directions they span), one every λ keeps (C singular along the keys), or a report read
                from an edit result.
        """
        return tuple(b.lambda_for(mean_leverage) for b in self.blocks)

    def plot(self, path: str | Path) -> Path:
        """Draws, per block, a histogram of the leverage, the mean leverage against λ (log axis, the
        block's λ marked) and each fact's leverage against its top-1 key cosine, into a PNG/PDF/SVG at
        ``path``; returns the path. Needs ``eamet[plot]`` (``MissingDependencyError`` otherwise).
        """

        return _plot_capacity(self, Path(path))

    @classmethod
    def of_result(cls, result: EditResult) -> CapacityReport:
        """The same quantities after an edit, from each :class:`~eamet.edit.solve.LayerUpdate`'s ``leverage``
        (the solve's own, on the keys of the partially edited model, with the float32 factors the edit
        applied) and, where the update still holds its keys, their top-M cosines ((N, 0) otherwise, as
        for a result read from a file). Such a report keeps no spectrum: :meth:`at` and
        :meth:`lambda_for` refuse it.

        Raises:
            ParameterError: an update without leverage (an edit file written before eamet recorded it).
        """
        config = result.config
        lam_of = dict(zip(config.layers, config.mom2_update_weight, strict=True))
        blocks = []
        for update in result.updates:
            if update.leverage.numel() == 0:
                raise ParameterError(
                    f"block {update.layer}: the edit result records no leverage (written by an older "
                    "eamet); recompute it with Editor.capacity(facts)",
                    argument="result",
                )
            leverage = update.leverage.double().numpy()
            keys = update.keys
            top = _top_cos(keys, config.top_m) if keys is not None else np.zeros((leverage.shape[0], 0))
            blocks.append(
                BlockCapacity(
                    update.layer, float(lam_of[update.layer]), leverage, top.astype(np.float32), "edit"
                )
            )
        return cls(blocks, len(result.facts), config.method, config.top_m)

    def _per_block(self, values: float | Sequence[float], argument: str) -> list[float]:
        if isinstance(values, float | int | numbers.Real):  # float | int narrows the type for mypy
            return [float(values)] * len(self.blocks)
        out = [float(v) for v in values]
        if len(out) != len(self.blocks):
            raise ParameterError(
                f"{argument}: one value for every block or one per block ({len(self.blocks)}), "
                f"got {len(out)}",
                argument=argument,
            )
        return out


def capacity_of(
    keys: Mapping[int, torch.Tensor],
    moments: Mapping[int, torch.Tensor],
    lambdas: Mapping[int, float],
    *,
    top_m: int,
    method: str,
) -> CapacityReport:
    """The capacity of each block from its keys and C alone (no residual, no weight touched).

    For each block: the leverage at its λ by the edit's own float64 Cholesky solve (on C's device), the
    top-M key cosines by the Rust core, and what the leverage at other λ needs. When C is positive
    definite (Cholesky succeeds with pivots well above rounding), the whitened keys' thin SVD gives any
    other λ at O(N·r); it is checked against the solve at the block's λ (to 1e-8) and, should it
    disagree, or when C is not positive definite (a small corpus, dead units), every other λ takes a
    Cholesky solve of λC + KᵀK instead (``source == "solve"``). float64 throughout.

    Args:
        keys: layer → (N, d_ff) keys (rows; any float dtype and device), the same N facts in every block.
        moments: layer → (d_ff, d_ff) C = E[k kᵀ] of that block.
        lambdas: layer → λ ≥ 0 (``mom2_update_weight``).
        top_m: key neighbours per fact for the cosines (≥ 1; clamped to N − 1).
        method: the config's method, for the report.

    Returns:
        A :class:`CapacityReport`, blocks in the order of ``keys``.

    Raises:
        ParameterError: no blocks, no facts, a block without C or λ, λ < 0 or not finite, top_m < 1.
        ShapeError: keys not 2-D, different N between blocks, C not d_ff × d_ff.
        NonFiniteError: NaN or Inf in keys (naming the row) or in C.
        SolveError: λC + KᵀK is not positive definite at a block's λ (the edit would fail the same way).
    """
    if not keys:
        raise ParameterError("capacity: no blocks given", argument="keys")
    if isinstance(top_m, bool) or not isinstance(top_m, numbers.Integral) or top_m < 1:
        raise ParameterError(f"top_m: must be an integer >= 1, got {top_m!r}", argument="top_m")
    checked: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    n: int | None = None
    for layer, k in keys.items():
        if layer not in moments:
            raise ParameterError(f"block {layer}: no second moment C given", argument="moments")
        if layer not in lambdas:
            raise ParameterError(f"block {layer}: no λ given", argument="lambdas")
        k_t, c_t = _check_block(layer, k, moments[layer])
        if n is not None and k_t.shape[0] != n:
            raise ShapeError(
                f"block {layer}: {k_t.shape[0]} key rows, but earlier blocks have {n} (the same facts)",
                argument="keys",
            )
        n = int(k_t.shape[0])
        checked[layer] = (k_t, c_t, _check_lambda(lambdas[layer], layer))
    blocks = [_block(layer, k_t, c_t, lam, int(top_m)) for layer, (k_t, c_t, lam) in checked.items()]
    return CapacityReport(blocks, blocks[0].n, method, int(top_m))


def _check_block(layer: int, keys: Any, moment: Any) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.as_tensor(keys)
    c = torch.as_tensor(moment)
    if k.ndim != 2:
        raise ShapeError(
            f"block {layer}: keys must be (N, d_ff), got shape {tuple(k.shape)}", argument="keys"
        )
    if k.shape[0] == 0:
        raise ParameterError(f"block {layer}: no facts (0 key rows)", argument="keys")
    d = int(k.shape[1])
    if tuple(c.shape) != (d, d):
        raise ShapeError(
            f"block {layer}: C has shape {tuple(c.shape)}, the keys need ({d}, {d})", argument="moments"
        )
    finite = torch.isfinite(k).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise NonFiniteError(f"block {layer}: key row {row} holds NaN or Inf", argument="keys", row=row)
    if not bool(torch.isfinite(c).all()):
        raise NonFiniteError(f"block {layer}: C holds NaN or Inf", argument="moments")
    return k, c


def _check_lambda(lam: Any, layer: int) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ParameterError(
            f"block {layer}: λ must be a finite number >= 0, got {lam!r}", argument="lambdas"
        )
    return float(lam)


def _check_target(target: Any) -> float:
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 < float(target) < 1:
        raise ParameterError(
            f"mean_leverage: the target must lie in (0, 1), got {target!r}", argument="mean_leverage"
        )
    return float(target)


def _top_cos(keys: torch.Tensor, top_m: int) -> np.ndarray:
    """(N, min(top_m, N − 1)) float32 cosines to each key's nearest other keys ((N, 0) for N = 1)."""
    if keys.shape[0] < 2:
        return np.zeros((keys.shape[0], 0), dtype=np.float32)
    return neighbors(keys, top_m, progress=False)[1]


def _block(layer: int, keys: torch.Tensor, moment: torch.Tensor, lam: float, top_m: int) -> BlockCapacity:
    leverage = _solved_leverage(moment, keys, lam, layer)
    curve: _Spectrum | _Direct = _Direct(moment, keys, layer)
    spectrum = _spectrum(moment, keys)
    if spectrum is not None and float(np.abs(spectrum.leverage(lam) - leverage).max()) <= _SVD_AGREEMENT:
        curve = spectrum
    return BlockCapacity(layer, lam, leverage, _top_cos(keys, top_m), curve.name, curve)


def _spectrum(moment: torch.Tensor, keys: torch.Tensor) -> _Spectrum | None:
    """The whitened keys' squared singular values and U², or ``None`` if C is not (safely) PD."""
    device = solve_device(moment.device)
    c = moment.to(device=device, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        return None
    pivots = torch.diagonal(chol) ** 2
    if float(pivots.min()) < _PIVOT_FLOOR * float(torch.diagonal(c).max()):
        return None
    k = keys.to(device=device, dtype=torch.float64)
    # K̃ = K L⁻ᵀ, i.e. K̃ᵀ = L⁻¹ Kᵀ: then K(λC + KᵀK)⁻¹Kᵀ = K̃(λI + K̃ᵀK̃)⁻¹K̃ᵀ.
    whitened = torch.linalg.solve_triangular(chol, k.T, upper=False).T
    u, s, _ = torch.linalg.svd(whitened, full_matrices=False)
    if not bool(torch.isfinite(s).all()):
        return None
    # Directions below rounding carry no key: dropping them keeps h at λ = 0 the rank's, not noise's.
    keep = s > float(s.max()) * max(whitened.shape) * torch.finfo(torch.float64).eps
    u, s = u[:, keep], s[keep]
    return _Spectrum((u * u).cpu().numpy(), (s * s).cpu().numpy())


def _plot_capacity(report: CapacityReport, path: Path) -> Path:
    """Writes one row of three panels per block to ``path`` and returns it: (a) the distribution of the
    leverage h_i with its mean; (b) the mean leverage tr(H)/N against λ on a log axis, the block's λ
    marked (absent for a report read from an edit, which keeps no spectrum); (c) each fact's leverage
    against its top-1 key cosine (crowded facts sit right).
    """
    figure = figure_class()

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
