"""The Rust kernels against the float64 numpy oracle (tests/oracle.py), over supports, shapes, dtypes,
memory layouts, torch tensors and tile sizes. Tolerances are derived in oracle.py's docstring."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest

import eamet
from eamet import _core
from oracle import (
    assert_matches_oracle,
    check_neighbor_rows,
    cosine_delta,
    cosine_matrix,
    misalignment_oracle,
    near_tie,
    neighbor_oracle,
)


def correlated_pair(
    rng: np.random.Generator, n: int, dk: int, dr: int, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Keys, and residuals that are a random linear image of the keys plus noise: neighbourhoods that
    partly agree, so scores and overlaps take varied values."""
    keys = rng.normal(size=(n, dk))
    residuals = keys @ rng.normal(size=(dk, dr)) + noise * rng.normal(size=(n, dr))
    return keys, residuals


def assert_same_report(a: Any, b: Any, *, score_tol: float | np.ndarray = 0.0) -> None:
    """Two kernel results computed from the same float32 cosines: identical neighbours, overlaps and
    MSE; scores within ``score_tol`` (0 when both ran on one thread with the same tiles, see
    ``test_thread_count_changes_scores_only_within_rounding``)."""

    def get(r: Any, k: str) -> np.ndarray:
        return np.asarray(r[k] if isinstance(r, dict) else getattr(r, k))

    for name in ("scores", "reverse_scores"):
        assert np.all(np.abs(get(a, name) - get(b, name)) <= score_tol), name
    for name in ("overlap", "topm_mse", "key_neighbors", "neighbor_key_cos", "neighbor_residual_cos"):
        np.testing.assert_array_equal(get(a, name), get(b, name), err_msg=name)


@pytest.mark.parametrize("progressive", [False, True], ids=["full", "progressive"])
@pytest.mark.parametrize(
    ("n", "dk", "dr", "top_m", "tau"),
    [(120, 16, 16, 10, 0.07), (90, 24, 6, 7, 0.07), (60, 8, 8, 50, 0.3), (150, 32, 32, 5, 0.02)],
)
def test_misalignment_matches_oracle(
    rng: np.random.Generator, n: int, dk: int, dr: int, top_m: int, tau: float, progressive: bool
) -> None:
    """Every output of eamet.misalignment equals the float64 definitions, for both supports."""
    keys, residuals = correlated_pair(rng, n, dk, dr)
    rep = eamet.misalignment(keys, residuals, tau=tau, top_m=top_m, progressive=progressive)
    assert (rep.tau, rep.progressive, len(rep)) == (tau, progressive, n)
    assert rep.total == pytest.approx(rep.scores.sum(), rel=1e-15)
    assert rep.mean == pytest.approx(rep.scores.mean(), rel=1e-15)
    oracle = misalignment_oracle(keys, residuals, tau=tau, top_m=top_m, progressive=progressive)
    assert_matches_oracle(rep, oracle)
    # The data is neither aligned nor unrelated: the comparison covers varied values.
    assert 0 < rep.overlap.mean() < 1 and rep.scores.max() > 0.1


@pytest.mark.parametrize("progressive", [False, True], ids=["full", "progressive"])
def test_top_m_larger_than_support_is_clamped(rng: np.random.Generator, progressive: bool) -> None:
    """top_m > N - 1 is clamped to N - 1; with the progressive support row i keeps only its i
    predecessors, padded with -1 / NaN, and its overlap divides by i."""
    n = 7
    keys, residuals = correlated_pair(rng, n, 5, 4)
    rep = eamet.misalignment(keys, residuals, top_m=50, progressive=progressive)
    assert rep.top_m == n - 1
    assert rep.key_neighbors.shape == rep.neighbor_key_cos.shape == (n, n - 1)
    valid = (rep.key_neighbors >= 0).sum(axis=1)
    want = np.arange(n) if progressive else np.full(n, n - 1)
    np.testing.assert_array_equal(valid, want)
    assert_matches_oracle(rep, misalignment_oracle(keys, residuals, top_m=50, progressive=progressive))
    if progressive:
        # every predecessor is a neighbour, so row i's list is a permutation of 0..i-1
        for i in range(n):
            assert sorted(rep.key_neighbors[i, :i].tolist()) == list(range(i))
        assert (rep.scores[0], rep.overlap[0], rep.topm_mse[0]) == (0.0, 1.0, 0.0)
    else:
        np.testing.assert_array_equal(rep.overlap, 1.0)  # every other row is in both top sets


def test_two_rows_is_the_smallest_input(rng: np.random.Generator) -> None:
    """N = 2: each row's only neighbour is the other one, and a one-point softmax has KL 0."""
    keys, residuals = correlated_pair(rng, 2, 3, 3)
    rep = eamet.misalignment(keys, residuals, top_m=5)
    assert rep.top_m == 1
    np.testing.assert_array_equal(rep.key_neighbors, [[1], [0]])
    np.testing.assert_array_equal(rep.scores, [0.0, 0.0])
    assert_matches_oracle(rep, misalignment_oracle(keys, residuals, top_m=5))


def expected_tie_broken_neighbors(x: np.ndarray, m: int, progressive: bool) -> np.ndarray:
    """Top-m lists of 1-D data computed by hand: same-sign rows (cosine +1) before opposite-sign rows
    (cosine -1), each group in index order."""
    n = x.shape[0]
    sign = np.sign(x[:, 0])
    out = np.full((n, m), -1)
    for i in range(n):
        sup = np.arange(i) if progressive else np.delete(np.arange(n), i)
        ranked = np.concatenate([sup[sign[sup] == sign[i]], sup[sign[sup] != sign[i]]])[:m]
        out[i, : ranked.size] = ranked
    return out


@pytest.mark.parametrize("progressive", [False, True], ids=["full", "progressive"])
def test_one_dimensional_rows_have_exact_ties_broken_by_index(
    rng: np.random.Generator, progressive: bool
) -> None:
    """d = 1: every cosine is exactly +1 or -1, so neighbour lists are decided by the smaller-index rule
    alone, and the kernel must follow it exactly (including across tiles)."""
    n, m = 70, 6
    keys = rng.choice([-1.0, 1.0], size=(n, 1)) * rng.uniform(0.1, 10.0, size=(n, 1))
    residuals = rng.choice([-1.0, 1.0], size=(n, 1)) * rng.uniform(0.1, 10.0, size=(n, 1))
    want = expected_tie_broken_neighbors(keys, m, progressive)
    for block in (0, 8, 16):
        raw = _core.misalignment(keys, residuals, tau=0.07, top_m=m, progressive=progressive, block=block)
        np.testing.assert_array_equal(raw["key_neighbors"], want, err_msg=f"block {block}")
        valid = want >= 0
        assert set(np.abs(raw["neighbor_key_cos"][valid]).tolist()) == {1.0}
        oracle = misalignment_oracle(keys, residuals, top_m=m, progressive=progressive)
        assert_matches_oracle(raw, oracle, exact_ties=True, min_determined=1.0)
    idx, sims = eamet.neighbors(keys, m)
    np.testing.assert_array_equal(idx, expected_tie_broken_neighbors(keys, m, False))
    assert set(np.abs(sims).ravel().tolist()) == {1.0}


def test_duplicated_rows(rng: np.random.Generator) -> None:
    """Rows that are positive multiples of each other have cosine 1: each row's first neighbours are
    exactly its duplicates, and all outputs still match the oracle."""
    n_base, copies = 20, 4
    n = n_base * copies
    which_k = rng.permutation(np.repeat(np.arange(n_base), copies))
    which_r = rng.permutation(np.repeat(np.arange(n_base), copies))
    keys = rng.normal(size=(n_base, 12))[which_k] * rng.uniform(0.5, 2.0, size=(n, 1))
    residuals = rng.normal(size=(n_base, 9))[which_r] * rng.uniform(0.5, 2.0, size=(n, 1))
    # M = the 3 duplicates + one whole other group: the top-M boundary falls between groups, so the
    # sets are determined even though the order inside each group of tied rows is not.
    m = copies - 1 + copies
    rep = eamet.misalignment(keys, residuals, top_m=m)
    for i in range(n):
        dups = np.flatnonzero((which_k == which_k[i]) & (np.arange(n) != i))
        assert set(rep.key_neighbors[i, : copies - 1].tolist()) == set(dups.tolist()), i
        np.testing.assert_allclose(rep.neighbor_key_cos[i, : copies - 1], 1.0, atol=cosine_delta(12))
        # the residual duplicates of row i are in its residual top set, so they count in the overlap
    assert_matches_oracle(rep, misalignment_oracle(keys, residuals, top_m=m))


@pytest.mark.parametrize(("dk", "dr"), [(3, 40), (40, 3), (1, 7), (64, 2)])
def test_keys_and_residuals_of_different_widths(rng: np.random.Generator, dk: int, dr: int) -> None:
    """d_k and d_r are independent: each space is normalised and compared on its own."""
    keys, residuals = correlated_pair(rng, 100, dk, dr)
    rep = eamet.misalignment(keys, residuals, top_m=9)
    oracle = misalignment_oracle(keys, residuals, top_m=9)
    # With d_k = 1 key cosines tie exactly; those ties are decided by index (see the 1-D test).
    assert_matches_oracle(rep, oracle, exact_ties=dk == 1, min_determined=0.5)


@pytest.mark.parametrize(
    ("key_dtype", "res_dtype"),
    [
        (np.float64, np.float64),
        (np.float32, np.float32),
        (np.float32, np.float64),
        (np.float64, np.float32),
        (np.float16, np.float16),
        (np.float16, np.float64),
    ],
    ids=lambda t: np.dtype(t).name,
)
def test_numpy_float_dtypes(rng: np.random.Generator, key_dtype: type, res_dtype: type) -> None:
    """float64, float32 and float16 numpy inputs (in every pairing the core dispatches) give the
    definitions evaluated on the same values."""
    keys, residuals = correlated_pair(rng, 90, 12, 10)
    keys, residuals = keys.astype(key_dtype), residuals.astype(res_dtype)
    rep = eamet.misalignment(keys, residuals, top_m=6)
    assert_matches_oracle(rep, misalignment_oracle(keys, residuals, top_m=6))


def strided_views(rng: np.random.Generator, n: int, d: int) -> dict[str, np.ndarray]:
    """(n, d) float arrays of the same kind of data in non-contiguous layouts."""
    return {
        "transposed": np.ascontiguousarray(rng.normal(size=(d, n))).T,
        "fortran": np.asfortranarray(rng.normal(size=(n, d))),
        "step-slices": rng.normal(size=(3 * n, 2 * d + 1))[::3, 1::2],
        "negative-steps": rng.normal(size=(n, d))[::-1, ::-1],
        "float32-column-slice": rng.normal(size=(n, d + 5)).astype(np.float32)[:, 2 : d + 2],
    }


@pytest.mark.parametrize(
    "layout", ["transposed", "fortran", "step-slices", "negative-steps", "float32-column-slice"]
)
def test_non_contiguous_numpy_inputs(rng: np.random.Generator, layout: str, restore_threads: None) -> None:
    """Strided, transposed and reversed views are read in place with exactly the result of a contiguous
    copy (one thread, so the float64 sums are merged in the same order), and match the oracle."""
    eamet.set_num_threads(1)
    n, d = 80, 9
    keys = strided_views(rng, n, d)[layout]
    residuals = strided_views(rng, n, d + 3)[layout]
    assert not keys.flags.c_contiguous and not residuals.flags.c_contiguous
    rep = eamet.misalignment(keys, residuals, top_m=7)
    copy = eamet.misalignment(np.ascontiguousarray(keys), np.ascontiguousarray(residuals), top_m=7)
    assert_same_report(rep, copy)
    assert_matches_oracle(rep, misalignment_oracle(keys, residuals, top_m=7))


def test_read_only_and_broadcast_inputs(rng: np.random.Generator, restore_threads: None) -> None:
    """Read-only arrays and zero-stride (broadcast) views are accepted and read correctly."""
    eamet.set_num_threads(1)
    keys, residuals = correlated_pair(rng, 40, 6, 6)
    frozen = keys.copy()
    frozen.flags.writeable = False
    rep = eamet.misalignment(frozen, residuals, top_m=4)
    assert_same_report(rep, eamet.misalignment(keys, residuals, top_m=4))
    # every row of a broadcast array is the same vector: all residual cosines are 1, P_r is uniform
    row = rng.normal(size=(1, 6))
    broadcast = np.broadcast_to(row, (40, 6))
    assert broadcast.strides[0] == 0
    rep = eamet.misalignment(keys, broadcast, top_m=4)
    assert_same_report(rep, eamet.misalignment(keys, np.repeat(row, 40, axis=0), top_m=4))
    np.testing.assert_allclose(rep.neighbor_residual_cos, 1.0, atol=cosine_delta(6))


def test_inputs_are_not_modified(rng: np.random.Generator) -> None:
    """The kernels only read their inputs."""
    keys, residuals = correlated_pair(rng, 50, 5, 5)
    keys32 = keys.astype(np.float32)
    before = (keys32.copy(), residuals.copy())
    eamet.misalignment(keys32, residuals, top_m=3)
    eamet.neighbors(keys32, 3)
    np.testing.assert_array_equal(keys32, before[0])
    np.testing.assert_array_equal(residuals, before[1])


@pytest.mark.parametrize(
    "scale",
    [1e-300, 1e-30, 1e30, 1e300, 1e-310],
    ids=["1e-300", "1e-30", "1e30", "1e300", "1e-310-subnormal"],
)
def test_extreme_row_magnitudes_normalise(rng: np.random.Generator, scale: float) -> None:
    """Cosines ignore row norms: scaling some rows by tiny, huge or subnormal (but finite, non-zero)
    factors changes nothing (the docs promise that any finite non-zero row normalises)."""
    keys, residuals = correlated_pair(rng, 40, 6, 5)
    scaled_k, scaled_r = keys.copy(), residuals.copy()
    scaled_k[::3] *= scale
    scaled_r[1::4] *= scale
    assert np.all(np.isfinite(scaled_k)) and np.all(np.any(scaled_k != 0, axis=1))
    rep = eamet.misalignment(scaled_k, scaled_r, top_m=5)
    oracle = misalignment_oracle(scaled_k, scaled_r, top_m=5)
    assert_matches_oracle(rep, oracle)
    idx, sims = eamet.neighbors(scaled_k, 5)
    assert check_neighbor_rows(idx, sims, neighbor_oracle(cosine_matrix(scaled_k), 5), 6) >= 30


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "requires_grad"])
def test_torch_tensors(dtype: str, layout: str) -> None:
    """CPU torch tensors of every float dtype, non-contiguous (``.t()``) or requiring grad, give the
    definitions evaluated on their values; the tensors themselves are left untouched."""
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}-{layout}".encode()))
    tdtype = getattr(torch, dtype)
    n, dk, dr = 70, 10, 7

    def make(d: int) -> torch.Tensor:
        if layout == "transposed":
            t = torch.randn(d, n, generator=gen).to(tdtype).t()
            assert not t.is_contiguous()
            return t
        return torch.randn(n, d, generator=gen).to(tdtype).requires_grad_(layout == "requires_grad")

    keys, residuals = make(dk), make(dr)
    snapshot = (keys.detach().clone(), residuals.detach().clone())
    rep = eamet.misalignment(keys, residuals, top_m=6)
    k64 = keys.detach().to(torch.float64).numpy()
    r64 = residuals.detach().to(torch.float64).numpy()
    assert_matches_oracle(rep, misalignment_oracle(k64, r64, top_m=6), min_determined=0.5)
    assert torch.equal(keys.detach(), snapshot[0]) and torch.equal(residuals.detach(), snapshot[1])
    assert keys.grad is None
    idx, sims = eamet.neighbors(keys, 6)
    assert check_neighbor_rows(idx, sims, neighbor_oracle(cosine_matrix(k64), 6), dk) >= n // 2


@pytest.mark.parametrize("progressive", [False, True], ids=["full", "progressive"])
@pytest.mark.parametrize("n", [50, 131, 300])
def test_tile_sizes_agree_with_each_other_and_the_oracle(
    rng: np.random.Generator, n: int, progressive: bool
) -> None:
    """Small tile edges split N into many tiles, so each upper tile also feeds its column block through
    the transposed path (16-column strips plus leftover columns for blocks 24/64 and N % block != 0);
    every tiling gives the oracle's result, and they agree with each other."""
    keys, residuals = correlated_pair(rng, n, 16, 12, noise=0.7)
    oracle = misalignment_oracle(keys, residuals, top_m=8, progressive=progressive)
    tol = oracle.score_tol()
    results = {}
    for block in (8, 16, 24, 64):
        raw = _core.misalignment(keys, residuals, tau=0.07, top_m=8, progressive=progressive, block=block)
        assert_matches_oracle(raw, oracle)
        results[block] = raw
    first = results[8]
    for block, raw in results.items():
        assert np.all(np.abs(raw["scores"] - first["scores"]) <= tol), block
        # top-M lists of determined rows are the oracle's, hence equal across tilings
        det = oracle.keys.order_gap > near_tie(16)
        np.testing.assert_array_equal(raw["key_neighbors"][det], first["key_neighbors"][det])


def test_thread_count_changes_scores_only_within_rounding(
    rng: np.random.Generator, restore_threads: None
) -> None:
    """With fixed tiles the cosines do not depend on the thread count, so neighbours, overlaps and MSE
    are identical; scores may differ only by float32 rounding (each thread count matches the oracle).

    Several threads merge tiles into a row in a varying order, and the float32 exponentials are taken
    relative to the running maximum of the moment, so scores are not bit-reproducible across runs.
    """
    keys, residuals = correlated_pair(rng, 200, 16, 16)
    oracle = misalignment_oracle(keys, residuals, top_m=10)
    runs = []
    for threads in (1, 2, 1, 2):
        eamet.set_num_threads(threads)
        assert eamet.get_num_threads() == threads
        raw = _core.misalignment(keys, residuals, tau=0.07, top_m=10, progressive=False, block=32)
        assert_matches_oracle(raw, oracle)
        runs.append(raw)
    assert_same_report(runs[0], runs[2])  # one thread: bit-reproducible
    assert_same_report(runs[0], runs[1], score_tol=oracle.score_tol())
    assert_same_report(runs[1], runs[3], score_tol=oracle.score_tol())


@pytest.mark.parametrize("block", [0, 8, 16, 64])
def test_neighbors_match_oracle(rng: np.random.Generator, block: int) -> None:
    """eamet.neighbors (and the core at several tile sizes): the top-M most similar other rows, best
    first, self excluded."""
    x = rng.normal(size=(150, 12)).astype(np.float32)
    oracle = neighbor_oracle(cosine_matrix(x), 9)
    idx, sims = eamet.neighbors(x, 9) if block == 0 else _core.neighbors(x, 9, block=block)
    assert check_neighbor_rows(idx, sims, oracle, 12) >= 0.9 * 150
    assert not np.any(idx == np.arange(150)[:, None])


@pytest.mark.parametrize("block", [0, 8, 16])
def test_exactly_orthogonal_rows_tie_at_zero(rng: np.random.Generator, block: int) -> None:
    """Rows along distinct axes have cosine exactly 0 to each other in float32 too: every candidate
    ties, so each row's neighbours are the smallest other indices, in order."""
    n = 40
    x = np.eye(n) * rng.uniform(0.5, 2.0, size=(n, 1))
    idx, sims = eamet.neighbors(x, 5) if block == 0 else _core.neighbors(x, 5, block=block)
    for i in range(n):
        assert idx[i].tolist() == [j for j in range(n) if j != i][:5], i
    np.testing.assert_array_equal(sims, 0.0)
    raw = _core.misalignment(x, x[::-1], tau=0.07, top_m=5, progressive=False, block=block)
    np.testing.assert_array_equal(raw["key_neighbors"], idx)
    # both cosine matrices are 0 off the diagonal: uniform distributions, nothing misaligned
    np.testing.assert_allclose(raw["scores"], 0.0, atol=1e-12)
    np.testing.assert_array_equal(raw["overlap"], 1.0)


def test_large_input_with_default_tiles(rng: np.random.Generator) -> None:
    """N = 1500 with the default tile size (several tiles of up to 512 rows) and the default top_m."""
    keys, residuals = correlated_pair(rng, 1500, 24, 20)
    rep = eamet.misalignment(keys.astype(np.float32), residuals, progress=False)
    assert rep.top_m == 50
    assert_matches_oracle(rep, misalignment_oracle(keys.astype(np.float32), residuals))


@pytest.mark.parametrize("tau", [1e-3, 0.01, 1.0, 100.0, 1e6])
def test_extreme_temperatures(rng: np.random.Generator, tau: float) -> None:
    """Very sharp and very flat softmaxes stay finite and match the oracle (its tolerance scales with
    1/tau)."""
    keys, residuals = correlated_pair(rng, 120, 10, 10)
    rep = eamet.misalignment(keys, residuals, tau=tau, top_m=6)
    assert_matches_oracle(rep, misalignment_oracle(keys, residuals, tau=tau, top_m=6))


def test_neighbors_clamp_top_m(rng: np.random.Generator) -> None:
    """top_m > N - 1 returns all N - 1 other rows, never self, never padding."""
    x = rng.normal(size=(6, 3))
    idx, sims = eamet.neighbors(x, 20)
    assert idx.shape == sims.shape == (6, 5)
    for i in range(6):
        assert sorted(idx[i].tolist()) == [j for j in range(6) if j != i]
    assert np.all(np.isfinite(sims))
    check_neighbor_rows(idx, sims, neighbor_oracle(cosine_matrix(x), 20), 3)


def test_neighbors_agree_with_misalignment_key_neighbors(rng: np.random.Generator) -> None:
    """The standalone neighbour kernel and the fused misalignment pass rank key neighbours alike."""
    keys, residuals = correlated_pair(rng, 200, 10, 10)
    idx, sims = eamet.neighbors(keys, 7)
    rep = eamet.misalignment(keys, residuals, top_m=7)
    oracle = neighbor_oracle(cosine_matrix(keys), 7)
    det = oracle.order_gap > near_tie(10)
    assert det.mean() > 0.9
    np.testing.assert_array_equal(idx[det], rep.key_neighbors[det])
    # each list is within cosine_delta of the exact sorted values, so within twice that of the other
    np.testing.assert_allclose(sims, rep.neighbor_key_cos, rtol=0, atol=2 * cosine_delta(10))
