"""A float64 numpy evaluation of eamet's definitions, and the comparisons of kernel output against it.

The oracle is written from the definitions in docs/diagnostic.md, not from the Rust code: for row i and
its support J_i (j != i, or j < i when progressive), P_x(i) = softmax_{j in J_i}(cos_x(i, j) / tau),
A(i) = KL(P_r || P_k), reverse = KL(P_k || P_r), top-M sets ranked by cosine (ties: smaller index),
overlap = |topK ∩ topR| / m_i, and the softmax(cos_k / tau)-weighted MSE over topK.

Tolerances (derived, not tuned)
-------------------------------
The kernel rounds unit rows to float32 and takes cosines with a float32 GEMM. With u = 2^-24, rounding
each unit row moves a cosine by at most 2u (Cauchy-Schwarz) and a d-term dot product of unit vectors by
at most d·u (the classical gamma_d bound); the float32 exponent argument (s - max)·(1/tau) adds about 6u
more in cosine units. So every cosine the kernel uses is within delta_d = (d + 8)·u of the exact one.

To first order, perturbing the key cosines by eps_j and the residual cosines by eta_j moves
A = sum_j p_j (lr_j - lk_j) (p = P_r, q = P_k, D = lr - lk) by

    dA = (1/tau) [ sum_j (q_j - p_j) eps_j + sum_j p_j (D_j - A) eta_j ],

so |dA| <= (delta_k S_k + delta_r S_r) / tau with S_k = sum|p - q| and S_r = sum p |D - A|. The kernel
also forms sum e_r (s_r - s_k) with float32 products (relative error about 7u per term including its
polynomial exp), adding at most 7u·sum p|s_r - s_k| / tau, and sums float32 exponentials into float64
(about 20u on ln Z_k - ln Z_r). The tolerance is twice the sum of these bounds (for second-order terms),
plus 1e-12. The reverse direction is symmetric. At tau = 0.07 and d = 16 this is 2-5 × 1e-5·(1 + A)
(the docs state about 1e-5·(1 + A)); the kernel's measured errors are 1-5 % of the bound, so a
comparison that fails is off by far more than rounding.

For topm_mse = sum w_j e_j^2 (e = cos_k - cos_r, w = softmax(cos_k / tau) over topK):
|d mse| <= (delta_k + delta_r) sum w 2|e| + (delta_k / tau) sum w |e^2 - mse|, doubled, plus 1e-12.

Neighbour indices are compared only where they are determined beyond rounding: where the oracle's gap
between the m-th and (m+1)-th candidate (for sets) or between any two consecutive candidates among the
first m + 1 (for the order) exceeds NEAR_TIE = max(1e-5, 2·delta_k). Elsewhere the sorted similarity
values are compared. With ``exact_ties=True`` a gap of exactly zero also counts as determined: for d = 1
every float32 cosine is exactly +-1, so the kernel sees the same exact ties and must break them by index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

U = 2.0**-24
"""Unit roundoff of float32."""
TIE_DECIMALS = 12
"""Oracle cosines are rounded to this many decimals for ranking, so float64 noise counts as a tie."""
NEAR_TIE_FLOOR = 1e-5


def cosine_delta(d: int) -> float:
    """Worst-case error of one kernel cosine of d-dimensional rows (see the module docstring)."""
    return (d + 8) * U


def near_tie(d: int) -> float:
    """Gap below which two candidates may be ranked either way by the float32 kernel."""
    return max(NEAR_TIE_FLOOR, 2.0 * cosine_delta(d))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit norm in float64 (rescaled by the largest magnitude first, so tiny,
    subnormal and huge rows normalise too)."""
    x = np.asarray(x, dtype=np.float64)
    y = x / np.abs(x).max(axis=1, keepdims=True)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """(N, N) float64 cosine similarities of the rows of ``x``."""
    u = unit_rows(x)
    return np.clip(u @ u.T, -1.0, 1.0)


def support(i: int, n: int, progressive: bool) -> np.ndarray:
    """J_i: indices j < i (progressive) or j != i, ascending."""
    return np.arange(i) if progressive else np.delete(np.arange(n), i)


def rank(values: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``candidates`` best first by ``values[candidates]`` (ties: smaller index), and their rounded values."""
    key = np.round(values[candidates], TIE_DECIMALS)
    order = np.lexsort((candidates, -key))
    return candidates[order], key[order]


def _log_softmax(s: np.ndarray, tau: float) -> np.ndarray:
    z = s / tau
    top = z.max()
    return z - (top + np.log(np.exp(z - top).sum()))


def _gaps(sorted_values: np.ndarray, m: int) -> tuple[float, float]:
    """(gap between the m-th and (m+1)-th value, smallest consecutive gap among the first m + 1)."""
    if sorted_values.size <= m:
        head = sorted_values
        boundary = np.inf
    else:
        head = sorted_values[: m + 1]
        boundary = float(head[m - 1] - head[m])
    steps = -np.diff(head)
    return boundary, float(steps.min()) if steps.size else np.inf


@dataclasses.dataclass(frozen=True)
class NeighborOracle:
    """Exact top-M lists of one cosine matrix, with the gaps that say where they are determined."""

    indices: np.ndarray  # (N, M) int64, -1 padded
    sims: np.ndarray  # (N, M) float64, NaN padded
    counts: np.ndarray  # (N,) m_i
    boundary_gap: np.ndarray  # (N,) gap at the m_i-th / (m_i+1)-th candidate (inf if |J_i| == m_i)
    order_gap: np.ndarray  # (N,) smallest consecutive gap among the first m_i + 1 candidates
    cos: np.ndarray  # (N, N)
    supports: tuple[np.ndarray, ...]


def neighbor_oracle(cos: np.ndarray, top_m: int, progressive: bool = False) -> NeighborOracle:
    """The top-min(top_m, N-1) candidates of every row of the cosine matrix ``cos``."""
    n = cos.shape[0]
    m = min(top_m, n - 1)
    indices = np.full((n, m), -1, dtype=np.int64)
    sims = np.full((n, m), np.nan)
    counts = np.zeros(n, dtype=np.int64)
    boundary = np.full(n, np.inf)
    order = np.full(n, np.inf)
    supports = []
    for i in range(n):
        sup = support(i, n, progressive)
        supports.append(sup)
        mi = min(m, sup.size)
        counts[i] = mi
        if mi == 0:
            continue
        ranked, key = rank(cos[i], sup)
        indices[i, :mi] = ranked[:mi]
        sims[i, :mi] = cos[i, ranked[:mi]]
        boundary[i], order[i] = _gaps(key, mi)
    return NeighborOracle(indices, sims, counts, boundary, order, cos, tuple(supports))


@dataclasses.dataclass(frozen=True)
class Oracle:
    """Every output of ``misalignment`` in float64, plus the sensitivities the tolerances need."""

    scores: np.ndarray
    reverse_scores: np.ndarray
    overlap: np.ndarray
    topm_mse: np.ndarray
    top_m: int
    tau: float
    progressive: bool
    dk: int
    dr: int
    keys: NeighborOracle
    residuals: NeighborOracle
    # first-order sensitivities (see the module docstring)
    s_keys: np.ndarray  # sum |p - q|
    s_res_fwd: np.ndarray  # sum p |D - A|
    s_res_rev: np.ndarray  # sum q |D' - B|
    s_diff_fwd: np.ndarray  # sum p |s_r - s_k|
    s_diff_rev: np.ndarray  # sum q |s_k - s_r|
    mse_err: np.ndarray  # sum w 2|e|
    mse_weights: np.ndarray  # sum w |e^2 - mse|

    def score_tol(self) -> np.ndarray:
        """Per-row bound on |kernel A(i) - oracle A(i)|."""
        dk, dr = cosine_delta(self.dk), cosine_delta(self.dr)
        first = (dk * self.s_keys + dr * self.s_res_fwd + 7 * U * self.s_diff_fwd) / self.tau
        return 2.0 * (first + 20 * U) + 1e-12

    def reverse_tol(self) -> np.ndarray:
        """Per-row bound on |kernel reverse(i) - oracle reverse(i)|."""
        dk, dr = cosine_delta(self.dk), cosine_delta(self.dr)
        first = (dr * self.s_keys + dk * self.s_res_rev + 7 * U * self.s_diff_rev) / self.tau
        return 2.0 * (first + 20 * U) + 1e-12

    def mse_tol(self) -> np.ndarray:
        """Per-row bound on |kernel mse(i) - oracle mse(i)| (for a determined top-M key set)."""
        dk, dr = cosine_delta(self.dk), cosine_delta(self.dr)
        return 2.0 * ((dk + dr) * self.mse_err + dk / self.tau * self.mse_weights) + 1e-12


def misalignment_oracle(
    keys: np.ndarray, residuals: np.ndarray, *, tau: float = 0.07, top_m: int = 50, progressive: bool = False
) -> Oracle:
    """Evaluates every definition of the misalignment report in float64 (see the module docstring)."""
    keys = np.asarray(keys, dtype=np.float64)
    residuals = np.asarray(residuals, dtype=np.float64)
    n = keys.shape[0]
    ck, cr = cosine_matrix(keys), cosine_matrix(residuals)
    nk = neighbor_oracle(ck, top_m, progressive)
    nr = neighbor_oracle(cr, top_m, progressive)
    out = {
        name: np.zeros(n)
        for name in (
            "scores",
            "reverse_scores",
            "topm_mse",
            "s_keys",
            "s_res_fwd",
            "s_res_rev",
            "s_diff_fwd",
            "s_diff_rev",
            "mse_err",
            "mse_weights",
        )
    }
    out["overlap"] = np.ones(n)
    for i in range(n):
        sup = nk.supports[i]
        mi = int(nk.counts[i])
        if sup.size == 0:
            continue
        sk, sr = ck[i, sup], cr[i, sup]
        lk, lr = _log_softmax(sk, tau), _log_softmax(sr, tau)
        p, q = np.exp(lr), np.exp(lk)
        a = float(np.sum(p * (lr - lk)))
        b = float(np.sum(q * (lk - lr)))
        out["scores"][i] = a
        out["reverse_scores"][i] = b
        out["s_keys"][i] = np.abs(p - q).sum()
        out["s_res_fwd"][i] = np.sum(p * np.abs(lr - lk - a))
        out["s_res_rev"][i] = np.sum(q * np.abs(lk - lr - b))
        out["s_diff_fwd"][i] = np.sum(p * np.abs(sr - sk))
        out["s_diff_rev"][i] = np.sum(q * np.abs(sk - sr))
        top_k, top_r = nk.indices[i, :mi], nr.indices[i, :mi]
        out["overlap"][i] = np.intersect1d(top_k, top_r).size / mi
        e = ck[i, top_k] - cr[i, top_k]
        w = np.exp(_log_softmax(ck[i, top_k], tau))
        mse = float(np.sum(w * e**2))
        out["topm_mse"][i] = mse
        out["mse_err"][i] = np.sum(w * 2 * np.abs(e))
        out["mse_weights"][i] = np.sum(w * np.abs(e**2 - mse))
    return Oracle(
        top_m=min(top_m, n - 1),
        tau=tau,
        progressive=progressive,
        dk=keys.shape[1],
        dr=residuals.shape[1],
        keys=nk,
        residuals=nr,
        **out,
    )


def _field(report: Any, name: str) -> Any:
    return report[name] if isinstance(report, Mapping) else getattr(report, name)


def _determined(gap: float, threshold: float, exact_ties: bool) -> bool:
    return gap > threshold or (exact_ties and gap == 0.0)


def check_neighbor_rows(
    indices: np.ndarray,
    sims: np.ndarray,
    oracle: NeighborOracle,
    d: int,
    *,
    exact_ties: bool = False,
    other_cos: np.ndarray | None = None,
    other_sims: np.ndarray | None = None,
    other_d: int = 0,
) -> int:
    """Asserts that kernel top-M lists ``indices``/``sims`` agree with ``oracle``; returns how many rows
    had their indices compared (in order or as a set).

    ``other_cos``/``other_sims`` optionally check a second cosine reported at the same neighbours (the
    residual cosine of each key neighbour).
    """
    n, m = oracle.indices.shape
    assert indices.shape == (n, m) and indices.dtype == np.int64, (indices.shape, indices.dtype)
    assert sims.shape == (n, m) and sims.dtype == np.float32, (sims.shape, sims.dtype)
    delta, tie = cosine_delta(d), near_tie(d)
    compared = 0
    for i in range(n):
        mi = int(oracle.counts[i])
        got, vals = indices[i, :mi], sims[i, :mi].astype(np.float64)
        where = f"row {i}: got {indices[i].tolist()}, want {oracle.indices[i].tolist()}"
        # padding beyond the support
        assert np.all(indices[i, mi:] == -1), where
        assert np.all(np.isnan(sims[i, mi:])), where
        # valid, distinct members of the support; never the row itself
        assert np.all(np.isin(got, oracle.supports[i])), where
        assert np.unique(got).size == mi, where
        assert not np.any(got == i), where
        # each similarity belongs to its index, and the kernel's own order is (sim desc, index asc)
        np.testing.assert_allclose(vals, oracle.cos[i, got], rtol=0, atol=delta, err_msg=where)
        for s in range(mi - 1):
            assert vals[s] > vals[s + 1] or (vals[s] == vals[s + 1] and got[s] < got[s + 1]), where
        # the values are the best ones, whatever the near-ties
        np.testing.assert_allclose(vals, oracle.sims[i, :mi], rtol=0, atol=delta, err_msg=where)
        if other_cos is not None and other_sims is not None:
            np.testing.assert_allclose(
                other_sims[i, :mi].astype(np.float64),
                other_cos[i, got],
                rtol=0,
                atol=cosine_delta(other_d),
                err_msg=where,
            )
            assert np.all(np.isnan(other_sims[i, mi:])), where
        if mi == 0:
            continue
        if _determined(oracle.order_gap[i], tie, exact_ties):
            assert got.tolist() == oracle.indices[i, :mi].tolist(), where
            compared += 1
        elif _determined(oracle.boundary_gap[i], tie, exact_ties):
            assert sorted(got.tolist()) == sorted(oracle.indices[i, :mi].tolist()), where
            compared += 1
    return compared


def assert_matches_oracle(
    report: Any, oracle: Oracle, *, exact_ties: bool = False, min_determined: float = 0.7
) -> None:
    """Asserts that a ``MisalignmentReport`` (or the raw dict of ``eamet._core.misalignment``) agrees with
    ``oracle`` within the derived tolerances, and that at least ``min_determined`` of the rows with a
    non-empty support had their neighbour indices, overlap and MSE compared exactly (not vacuous)."""
    n = oracle.scores.shape[0]
    m = oracle.top_m
    assert int(_field(report, "top_m")) == m
    scores = np.asarray(_field(report, "scores"))
    reverse = np.asarray(_field(report, "reverse_scores"))
    overlap = np.asarray(_field(report, "overlap"))
    mse = np.asarray(_field(report, "topm_mse"))
    for name, arr in (("scores", scores), ("reverse", reverse), ("overlap", overlap), ("mse", mse)):
        assert arr.shape == (n,) and arr.dtype == np.float64, (name, arr.shape, arr.dtype)
        assert np.all(np.isfinite(arr)), (name, arr)
    assert np.all(scores >= 0) and np.all(reverse >= 0)
    err = np.abs(scores - oracle.scores)
    tol = oracle.score_tol()
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, (
        f"scores differ at rows {bad[:10]}: got {scores[bad[:5]]}, want {oracle.scores[bad[:5]]}"
    )
    err = np.abs(reverse - oracle.reverse_scores)
    bad = np.flatnonzero(err > oracle.reverse_tol())
    assert bad.size == 0, (
        f"reverse differs at {bad[:10]}: {reverse[bad[:5]]} vs {oracle.reverse_scores[bad[:5]]}"
    )

    key_idx = np.asarray(_field(report, "key_neighbors"))
    key_cos = np.asarray(_field(report, "neighbor_key_cos"))
    res_cos = np.asarray(_field(report, "neighbor_residual_cos"))
    assert res_cos.shape == (n, m) and res_cos.dtype == np.float32
    check_neighbor_rows(
        key_idx,
        key_cos,
        oracle.keys,
        oracle.dk,
        exact_ties=exact_ties,
        other_cos=oracle.residuals.cos,
        other_sims=res_cos,
        other_d=oracle.dr,
    )

    tie_k, tie_r = near_tie(oracle.dk), near_tie(oracle.dr)
    mse_tol = oracle.mse_tol()
    determined = 0
    nonempty = 0
    for i in range(n):
        mi = int(oracle.keys.counts[i])
        if mi == 0:
            assert (scores[i], reverse[i], overlap[i], mse[i]) == (0.0, 0.0, 1.0, 0.0), i
            continue
        nonempty += 1
        # overlap is always a count over m_i
        assert 0.0 <= overlap[i] <= 1.0
        assert abs(overlap[i] * mi - round(overlap[i] * mi)) < 1e-9, (i, overlap[i], mi)
        assert mse[i] >= 0.0
        key_set = _determined(oracle.keys.boundary_gap[i], tie_k, exact_ties)
        res_set = _determined(oracle.residuals.boundary_gap[i], tie_r, exact_ties)
        if key_set:
            assert abs(mse[i] - oracle.topm_mse[i]) <= mse_tol[i], (i, mse[i], oracle.topm_mse[i])
        if key_set and res_set:
            assert abs(overlap[i] - oracle.overlap[i]) < 1e-12, (i, overlap[i], oracle.overlap[i])
            determined += 1
    assert determined >= min_determined * nonempty, f"only {determined} of {nonempty} rows were determined"
