"""``neighbors(..., progressive=True)``: each row's top-M among the earlier rows only, against the float64
brute-force oracle of tests/oracle.py (tolerances and near-tie rules are derived there), over sizes,
M larger than the support, dtypes, tile sizes, exact ties, padding and errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import eamet
from eamet import _core
from eamet.base.errors import NonFiniteError, ParameterError, ShapeError, ZeroNormError
from oracle import check_neighbor_rows, cosine_matrix, neighbor_oracle


def progressive(x: Any, top_m: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The public wrapper for the default tiles, the core for a given tile edge."""
    if block == 0:
        return eamet.neighbors(x, top_m, progressive=True)
    return _core.neighbors(x, top_m, progressive=True, block=block)


def assert_padding(idx: np.ndarray, sims: np.ndarray, top_m: int) -> None:
    """Shape (N, M), M = min(top_m, N - 1); row i has min(M, i) entries, then -1 / NaN."""
    n = idx.shape[0]
    m = min(top_m, n - 1)
    assert idx.shape == sims.shape == (n, m)
    assert idx.dtype == np.int64 and sims.dtype == np.float32
    for i in range(n):
        k = min(m, i)
        assert np.all(idx[i, :k] >= 0) and np.all(idx[i, :k] < i), i
        assert not np.any(np.isnan(sims[i, :k])), i
        assert np.all(idx[i, k:] == -1) and np.all(np.isnan(sims[i, k:])), i


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "top_m", "block"),
    [(2, 1, 0), (3, 5, 0), (17, 4, 0), (17, 40, 1), (60, 7, 7), (60, 100, 16), (150, 9, 0), (150, 9, 64)],
)
def test_matches_brute_force_oracle(
    rng: np.random.Generator, dtype: type, n: int, top_m: int, block: int
) -> None:
    """Random rows: the kernel's lists agree with the oracle's over j < i, in order (or as a set)
    wherever rounding cannot reorder them, and its similarities are the best ones within rounding."""
    d = 12
    x = rng.normal(size=(n, d)).astype(dtype)
    oracle = neighbor_oracle(cosine_matrix(x), top_m, progressive=True)
    idx, sims = progressive(x, top_m, block)
    assert_padding(idx, sims, top_m)
    compared = check_neighbor_rows(idx, sims, oracle, d)
    assert compared >= 0.9 * (n - 1)  # row 0 has nothing to compare


@pytest.mark.parametrize("block", [0, 1, 8, 16])
def test_exact_ties_go_to_the_smaller_index(rng: np.random.Generator, block: int) -> None:
    """d = 1: every cosine is exactly +1 or -1, so the lists are the same-sign earlier rows, then the
    opposite-sign ones, each in index order; the progressive misalignment kernel agrees."""
    n, m = 70, 6
    x = rng.choice([-1.0, 1.0], size=(n, 1)) * rng.uniform(0.1, 10.0, size=(n, 1))
    sign = np.sign(x[:, 0])
    want = np.full((n, m), -1)
    for i in range(n):
        sup = np.arange(i)
        ranked = np.concatenate([sup[sign[sup] == sign[i]], sup[sign[sup] != sign[i]]])[:m]
        want[i, : ranked.size] = ranked
    idx, sims = progressive(x, m, block)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(np.abs(sims[want >= 0]), 1.0)
    raw = _core.misalignment(x, x, tau=0.07, top_m=m, progressive=True, block=block)
    np.testing.assert_array_equal(raw["key_neighbors"], idx)


@pytest.mark.parametrize("block", [0, 8])
def test_orthogonal_rows_take_the_first_earlier_rows(rng: np.random.Generator, block: int) -> None:
    """Cosines exactly 0 between distinct axes: row i's neighbours are 0, 1, ..., min(M, i) - 1."""
    n, m = 30, 5
    x = np.eye(n) * rng.uniform(0.5, 2.0, size=(n, 1))
    idx, sims = progressive(x, m, block)
    for i in range(n):
        assert idx[i].tolist() == [*range(min(m, i)), *[-1] * (m - min(m, i))], i
    np.testing.assert_array_equal(sims[idx >= 0], 0.0)
    assert_padding(idx, sims, m)


def test_padding_of_the_first_rows() -> None:
    """Row 0 is all padding; row 1's only candidate is row 0; M is clamped to N - 1 as without
    ``progressive``."""
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.5]])
    idx, sims = eamet.neighbors(x, 10, progressive=True)
    assert idx.shape == (4, 3)
    assert idx.tolist() == [[-1, -1, -1], [0, -1, -1], [1, 0, -1], [2, 1, 0]]
    assert np.isnan(sims[0]).all() and np.isnan(sims[1, 1:]).all() and np.isnan(sims[2, 2]).all()
    np.testing.assert_allclose(sims[1, 0], np.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(
        sims[3], [0.5 / np.sqrt(1.25), -0.5 / np.sqrt(2.5), -1 / np.sqrt(1.25)], rtol=1e-6
    )
    full_idx, _ = eamet.neighbors(x, 10)
    assert full_idx.shape == (4, 3) and np.all(full_idx >= 0)


def test_default_is_the_full_support(rng: np.random.Generator) -> None:
    """``progressive=False`` (the default) is the j != i support, bit for bit."""
    x = rng.normal(size=(40, 6))
    a, sa = eamet.neighbors(x, 5)
    b, sb = eamet.neighbors(x, 5, progressive=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)
    assert np.any(a > np.arange(40)[:, None])  # later rows do appear without progressive


@pytest.mark.usefixtures("restore_threads")
def test_same_result_on_one_thread(rng: np.random.Generator) -> None:
    """Each pair's cosine comes from one fixed tile and the heaps' ranking is total, so the thread
    count (and the order tiles finish in) changes nothing."""
    x = rng.normal(size=(130, 9)).astype(np.float32)
    many = _core.neighbors(x, 8, progressive=True, block=16)
    eamet.set_num_threads(1)
    one = _core.neighbors(x, 8, progressive=True, block=16)
    np.testing.assert_array_equal(many[0], one[0])
    np.testing.assert_array_equal(many[1], one[1])


def test_strided_and_torch_inputs(rng: np.random.Generator) -> None:
    """A non-contiguous view and a torch tensor give the result of the contiguous array."""
    x = rng.normal(size=(9, 50))
    want = eamet.neighbors(np.ascontiguousarray(x.T), 4, progressive=True)
    got = eamet.neighbors(x.T, 4, progressive=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    torch = pytest.importorskip("torch")
    from_torch = eamet.neighbors(torch.from_numpy(x).T, 4, progressive=True)
    np.testing.assert_array_equal(from_torch[0], want[0])


def test_progress_callback_reports_completion(rng: np.random.Generator) -> None:
    calls: list[tuple[int, int]] = []
    _core.neighbors(
        rng.normal(size=(50, 4)), 3, progressive=True, block=8, progress=lambda d, t: calls.append((d, t))
    )
    assert calls and calls[-1][0] == calls[-1][1] == 28  # 7 row blocks: 7 * 8 / 2 upper tiles


def test_errors(rng: np.random.Generator) -> None:
    """The rules of the full support: N >= 2, top_m >= 1, finite non-zero rows (named)."""
    with pytest.raises(ShapeError) as shape:
        eamet.neighbors(np.ones((1, 3)), 1, progressive=True)
    assert shape.value.argument == "x"
    with pytest.raises(ParameterError):
        eamet.neighbors(np.ones((4, 3)), 0, progressive=True)
    with pytest.raises(ParameterError):
        _core.neighbors(np.ones((4, 3)), 2, progressive=True, block=-1)
    x = rng.normal(size=(6, 3))
    x[4, 1] = np.inf
    with pytest.raises(NonFiniteError) as bad:
        eamet.neighbors(x, 2, progressive=True)
    assert (bad.value.argument, bad.value.row) == ("x", 4)
    x[4, 1] = 0.0
    x[0] = 0.0  # row 0 has no candidates but still needs a cosine as someone else's candidate
    with pytest.raises(ZeroNormError) as zero:
        eamet.neighbors(x, 2, progressive=True)
    assert zero.value.row == 0
