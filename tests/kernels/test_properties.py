"""Hypothesis properties: non-negativity, invariance to rotations and row scaling, permutation
equivariance, and SecondMoment merges. Data comes from a numpy RNG seeded by a drawn integer."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import eamet
from eamet import _core
from oracle import U, assert_matches_oracle, cosine_delta, misalignment_oracle, near_tie

seeds = st.integers(min_value=0, max_value=2**32 - 1)
taus = st.sampled_from([0.02, 0.07, 0.5, 3.0])
blocks = st.sampled_from([0, 8, 16, 24])


def random_orthonormal_columns(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols), from a QR factorisation."""
    q, r = np.linalg.qr(rng.normal(size=(rows, cols)))
    return q * np.sign(np.diag(r))  # fix signs: Haar-distributed


@given(
    seed=seeds,
    n=st.integers(2, 90),
    dk=st.integers(1, 24),
    dr=st.integers(1, 24),
    top_m=st.integers(1, 40),
    tau=taus,
    progressive=st.booleans(),
    block=blocks,
)
def test_kl_divergences_are_non_negative(
    seed: int, n: int, dk: int, dr: int, top_m: int, tau: float, progressive: bool, block: int
) -> None:
    """A(i) >= 0 and the reverse KL >= 0 for any data, support, temperature and tiling; overlap is in
    [0, 1] and the MSE is >= 0."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, dk)) * rng.uniform(0.1, 10, size=(n, 1))
    residuals = rng.normal(size=(n, dr))
    raw = _core.misalignment(keys, residuals, tau=tau, top_m=top_m, progressive=progressive, block=block)
    assert np.all(raw["scores"] >= 0) and np.all(raw["reverse_scores"] >= 0)
    assert np.all(np.isfinite(raw["scores"])) and np.all(np.isfinite(raw["reverse_scores"]))
    assert np.all((raw["overlap"] >= 0) & (raw["overlap"] <= 1))
    assert np.all(raw["topm_mse"] >= 0)


@given(
    seed=seeds,
    n=st.integers(3, 100),
    d=st.integers(1, 32),
    extra=st.integers(0, 16),
    top_m=st.integers(1, 30),
    tau=taus,
    progressive=st.booleans(),
    float32=st.booleans(),
)
def test_rotated_and_rescaled_residuals_are_aligned(
    seed: int, n: int, d: int, extra: int, top_m: int, tau: float, progressive: bool, float32: bool
) -> None:
    """residuals = keys @ Q (orthonormal columns, possibly into a wider space) with every row scaled by
    its own positive factor have the same cosines as the keys, so A = reverse = 0 and the top-M sets
    coincide. Where the kernel reports overlap < 1, the float64 cosines must have a near-tie (< 1e-5) at
    the key top-M boundary that float32 rounding may break either way."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d))
    q = random_orthonormal_columns(rng, d + extra, d).T  # (d, d + extra), Q Qᵀ = I
    residuals = (keys @ q) * np.exp(rng.uniform(-5, 5, size=(n, 1)))
    if float32:
        keys, residuals = keys.astype(np.float32), residuals.astype(np.float32)
    rep = eamet.misalignment(keys, residuals, tau=tau, top_m=top_m, progressive=progressive)
    np.testing.assert_allclose(rep.scores, 0.0, atol=1e-5)
    np.testing.assert_allclose(rep.reverse_scores, 0.0, atol=1e-5)
    oracle = misalignment_oracle(keys, residuals, tau=tau, top_m=top_m, progressive=progressive)
    unexplained = [
        i for i in np.flatnonzero(rep.overlap < 1) if not oracle.keys.boundary_gap[i] < near_tie(d)
    ]
    assert unexplained == [], (unexplained, oracle.keys.boundary_gap[unexplained])
    # Same cosines, so the residual cosine of every key neighbour is its key cosine.
    valid = rep.key_neighbors >= 0
    atol = cosine_delta(d) + cosine_delta(d + extra) + 4 * U  # + rounding the inputs to float32
    np.testing.assert_allclose(rep.neighbor_residual_cos[valid], rep.neighbor_key_cos[valid], atol=atol)
    np.testing.assert_allclose(rep.topm_mse, 0.0, atol=1e-9)


@given(
    seed=seeds,
    n=st.integers(2, 80),
    dk=st.integers(2, 16),
    dr=st.integers(2, 16),
    top_m=st.integers(1, 20),
    tau=taus,
)
def test_row_permutation_permutes_the_report(
    seed: int, n: int, dk: int, dr: int, top_m: int, tau: float
) -> None:
    """Permuting the rows of both inputs permutes scores, overlaps and MSE, and maps neighbour indices
    through the permutation (full support only).

    The progressive support j < i is defined by the row order itself: a permutation changes which facts
    precede fact i, hence the distributions P_k(i), P_r(i), not just their labels, so it has no such
    symmetry.
    """
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, dk))
    residuals = keys @ rng.normal(size=(dk, dr)) + rng.normal(size=(n, dr))
    perm = rng.permutation(n)
    base = eamet.misalignment(keys, residuals, tau=tau, top_m=top_m)
    moved = eamet.misalignment(keys[perm], residuals[perm], tau=tau, top_m=top_m)
    # Row a of the permuted problem is fact perm[a]; its neighbour b is fact perm[b].
    back = {
        name: np.empty_like(getattr(moved, name))
        for name in ("scores", "reverse_scores", "overlap", "topm_mse", "key_neighbors")
    }
    for name in ("scores", "reverse_scores", "overlap", "topm_mse"):
        back[name][perm] = getattr(moved, name)
    back["key_neighbors"][perm] = np.where(moved.key_neighbors >= 0, perm[moved.key_neighbors], -1)
    back["neighbor_key_cos"] = np.empty_like(moved.neighbor_key_cos)
    back["neighbor_key_cos"][perm] = moved.neighbor_key_cos
    back["neighbor_residual_cos"] = np.empty_like(moved.neighbor_residual_cos)
    back["neighbor_residual_cos"][perm] = moved.neighbor_residual_cos
    back["top_m"] = moved.top_m
    # Both the original and the un-permuted report satisfy the definitions on the original order ...
    oracle = misalignment_oracle(keys, residuals, tau=tau, top_m=top_m)
    assert_matches_oracle(base, oracle, min_determined=0.0)
    assert_matches_oracle(back, oracle, min_determined=0.0)
    # ... and agree with each other: scores within rounding, neighbours exactly where determined.
    assert np.all(np.abs(back["scores"] - base.scores) <= oracle.score_tol())
    assert np.all(np.abs(back["reverse_scores"] - base.reverse_scores) <= oracle.reverse_tol())
    det = oracle.keys.order_gap > near_tie(dk)
    np.testing.assert_array_equal(back["key_neighbors"][det], base.key_neighbors[det])
    sets = det | (oracle.keys.boundary_gap > near_tie(dk))
    sets &= oracle.residuals.boundary_gap > near_tie(dr)
    np.testing.assert_array_equal(back["overlap"][sets], base.overlap[sets])


@given(
    seed=seeds,
    dim=st.integers(1, 40),
    rows=st.integers(1, 300),
    parts=st.integers(2, 4),
    data=st.data(),
)
def test_second_moment_merge_of_a_split_equals_one_pass(
    seed: int, dim: int, rows: int, parts: int, data: st.DataObject
) -> None:
    """Accumulating a random split of the rows (2-4 parts, each float32 or float64) in separate
    accumulators and merging them equals one accumulator fed the same parts in turn, and the float64
    X^T X / n of the values; counts add up and the input dtype is tracked."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, dim)) * rng.uniform(0.1, 3.0, size=dim)
    cuts = np.sort(rng.integers(0, rows + 1, size=parts - 1))
    pieces = np.split(x, cuts)
    kinds = data.draw(st.lists(st.sampled_from([np.float32, np.float64]), min_size=parts, max_size=parts))
    pieces = [p.astype(k) for p, k in zip(pieces, kinds, strict=True)]

    one_pass = eamet.SecondMoment(dim)
    merged = eamet.SecondMoment(dim)
    for piece in pieces:
        one_pass.update(piece)
        part = eamet.SecondMoment(dim)
        part.update(piece)
        assert part.count == piece.shape[0]
        merged.merge(part)
    assert merged.count == one_pass.count == rows
    seen = {np.dtype(p.dtype).name for p in pieces if p.shape[0]}
    want_dtype = "mixed" if len(seen) == 2 else seen.pop()
    assert merged.input_dtype == one_pass.input_dtype == want_dtype
    # The same float32 chunk products are added in a different order: float64 rounding only.
    scale = np.abs(x).T @ np.abs(x) / rows
    assert np.all(np.abs(merged.moment() - one_pass.moment()) <= 1e-13 * scale)
    # Against float64 X^T X of the values: float32 parts are multiplied in float32 (gamma_n bound).
    values = np.concatenate([p.astype(np.float64) for p in pieces])
    want = values.T @ values / rows
    assert np.all(np.abs(merged.moment() - want) <= (min(rows, 2048) + 2) * 2.0**-24 * scale)


@given(
    seed=seeds,
    n=st.integers(2, 120),
    dk=st.integers(1, 20),
    dr=st.integers(1, 20),
    top_m=st.integers(1, 60),
    tau=taus,
    progressive=st.booleans(),
    block=blocks,
    dtypes=st.sampled_from([(np.float64, np.float64), (np.float32, np.float32), (np.float32, np.float64)]),
    alignment=st.sampled_from([0.0, 0.5, 2.0]),
)
def test_kernel_matches_oracle_on_random_problems(
    seed: int,
    n: int,
    dk: int,
    dr: int,
    top_m: int,
    tau: float,
    progressive: bool,
    block: int,
    dtypes: tuple[type, type],
    alignment: float,
) -> None:
    """Any shape, clamping, temperature, support, tiling and dtype pairing: the kernel equals the
    definitions (tolerances and near-tie rules of oracle.py)."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, dk))
    residuals = alignment * keys @ rng.normal(size=(dk, dr)) + rng.normal(size=(n, dr))
    keys, residuals = keys.astype(dtypes[0]), residuals.astype(dtypes[1])
    raw = _core.misalignment(keys, residuals, tau=tau, top_m=top_m, progressive=progressive, block=block)
    oracle = misalignment_oracle(keys, residuals, tau=tau, top_m=top_m, progressive=progressive)
    # d = 1 rows tie exactly in float32 too, so index order decides them exactly
    assert_matches_oracle(raw, oracle, exact_ties=dk == 1 and dr == 1, min_determined=0.0)
