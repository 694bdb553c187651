"""``SecondMoment.from_sum``: an accumulator from an already-accumulated Σ x xᵀ (e.g. summed on a GPU)
and its row count, equal to streaming the rows through ``update``, and mergeable and saveable like one.

Tolerance: both paths compute X^T X in float64 with different summation orders, so each entry is within
a few n·2^-53 of |X|^T|X| / n; 1e-12 of it is a wide margin for the sizes here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eamet import SecondMoment, _core
from eamet.base.errors import DTypeError, EmptyError, NonFiniteError, ParameterError, ShapeError


def magnitude(x: np.ndarray) -> np.ndarray:
    """|X|^T |X| / n: the scale rounding errors of X^T X / n are measured against."""
    a = np.abs(x.astype(np.float64))
    return a.T @ a / x.shape[0]


def streamed(x: np.ndarray) -> SecondMoment:
    acc = SecondMoment(x.shape[1])
    acc.update(x)
    return acc


def test_equals_the_update_path(rng: np.random.Generator) -> None:
    x = rng.normal(size=(500, 70)) * rng.uniform(0.1, 10, size=70)
    acc = SecondMoment.from_sum(x.T @ x, 500, input_dtype="float64")
    got, want = acc.moment(), streamed(x).moment()
    assert np.all(np.abs(got - want) <= 1e-12 * magnitude(x))
    np.testing.assert_array_equal(got, got.T)
    assert (acc.dim, acc.count, acc.input_dtype, acc.metadata) == (70, 500, "float64", {})
    assert repr(acc) == "SecondMoment(dim=70, count=500, input_dtype='float64')"


def test_stores_the_upper_triangle_exactly(rng: np.random.Generator) -> None:
    """The moment is the upper triangle (mirrored) times 1/count, bit for bit; the lower triangle is
    never read, so ``total`` need not be symmetric."""
    total = rng.normal(size=(9, 9))
    upper = np.triu(total)
    want = (upper + np.triu(total, 1).T) * (1.0 / 7)
    skewed = upper + np.tril(rng.normal(size=(9, 9)) * 1e6, -1)
    np.testing.assert_array_equal(SecondMoment.from_sum(skewed, 7).moment(), want)
    np.testing.assert_array_equal(SecondMoment.from_sum(total, 7).moment(), want)


def test_float32_and_strided_totals(rng: np.random.Generator) -> None:
    """A float32 ``total`` is widened exactly; any strides are read in place (a transposed view reads
    the original's lower triangle)."""
    total = rng.normal(size=(6, 6)).astype(np.float32)
    acc = SecondMoment.from_sum(total, 3)
    wide = np.triu(total.astype(np.float64))
    np.testing.assert_array_equal(acc.moment(), (wide + np.triu(wide, 1).T) * (1.0 / 3))
    assert acc.input_dtype == "float32"  # the default
    low = np.tril(total.astype(np.float64))
    np.testing.assert_array_equal(
        SecondMoment.from_sum(total.T, 3).moment(), (low + np.tril(low, -1).T) * (1.0 / 3)
    )
    np.testing.assert_array_equal(SecondMoment.from_sum(np.asfortranarray(total), 3).moment(), acc.moment())


def test_torch_totals(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(40, 8))
    t = torch.from_numpy(x)
    acc = SecondMoment.from_sum(t.T @ t, 40, input_dtype="float64", metadata={"device": "cpu"})
    assert np.all(np.abs(acc.moment() - streamed(x).moment()) <= 1e-12 * magnitude(x))
    assert acc.metadata == {"device": "cpu"}
    half = SecondMoment.from_sum((t.T @ t).to(torch.float16), 40)
    assert half.input_dtype == "float32" and half.dim == 8


def test_save_load_round_trip(rng: np.random.Generator, tmp_path: Path) -> None:
    x = rng.normal(size=(30, 11)).astype(np.float32)
    acc = SecondMoment.from_sum(x.T.astype(np.float64) @ x, 30, metadata={"layer": 5})
    path = tmp_path / "c.safetensors"
    acc.save(path)
    back = SecondMoment.load(path)
    np.testing.assert_array_equal(back.moment(), acc.moment())
    assert (back.count, back.input_dtype, back.metadata) == (30, "float32", {"layer": 5})


def test_merges_with_streamed_accumulators(rng: np.random.Generator) -> None:
    """from_sum(A^T A) merged with update(B), either way round, equals update(A; B); further updates
    keep accumulating."""
    a, b, c = rng.normal(size=(120, 16)), rng.normal(size=(80, 16)), rng.normal(size=(25, 16))
    whole = np.vstack([a, b, c])
    left = SecondMoment.from_sum(a.T @ a, 120, input_dtype="float64")
    left.merge(streamed(b))
    right = streamed(b)
    right.merge(SecondMoment.from_sum(a.T @ a, 120, input_dtype="float64"))
    for acc in (left, right):
        acc.update(c)
        assert acc.count == 225 and acc.input_dtype == "float64"
        assert np.all(np.abs(acc.moment() - streamed(whole).moment()) <= 1e-12 * magnitude(whole))
    mixed = SecondMoment.from_sum(a.T @ a, 120)
    mixed.merge(streamed(b))
    assert mixed.input_dtype == "mixed"
    assert SecondMoment.from_sum(a.T @ a, 1, input_dtype="mixed").input_dtype == "mixed"
    with pytest.raises(ShapeError):
        left.merge(SecondMoment.from_sum(np.eye(3), 1))


def test_core_staticmethod() -> None:
    acc = _core.SecondMoment.from_sum(np.eye(2), 4)
    assert (acc.dim, acc.count, acc.input_dtype) == (2, 4, "float32")
    np.testing.assert_array_equal(acc.moment(), np.eye(2) / 4)
    with pytest.raises(ParameterError) as zero:
        _core.SecondMoment.from_sum(np.eye(2), 0, "float64")
    assert zero.value.argument == "count"


@pytest.mark.parametrize("shape", [(3, 4), (4,), (2, 2, 2)])
def test_shape_errors(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError) as err:
        SecondMoment.from_sum(np.ones(shape), 1)
    assert err.value.argument == "total"


def test_value_errors() -> None:
    with pytest.raises(EmptyError):
        SecondMoment.from_sum(np.ones((0, 0)), 1)
    total = np.eye(5)
    for row, col in ((3, 4), (4, 0)):  # upper and lower triangle alike
        bad = total.copy()
        bad[row, col] = np.nan if col else -np.inf
        with pytest.raises(NonFiniteError) as err:
            SecondMoment.from_sum(bad, 2)
        assert (err.value.argument, err.value.row) == ("total", row)
    with pytest.raises(DTypeError):
        SecondMoment.from_sum(np.eye(3, dtype=np.int64), 1)


@pytest.mark.parametrize("count", [0, -3, 2**63, True, 1.5, "7", None])
def test_bad_count(count: object) -> None:
    with pytest.raises(ParameterError) as err:
        SecondMoment.from_sum(np.eye(2), count)  # type: ignore[arg-type]
    assert err.value.argument == "count"


@pytest.mark.parametrize("input_dtype", ["none", "float16", "Float32", "", 32])
def test_bad_input_dtype(input_dtype: object) -> None:
    with pytest.raises(ParameterError) as err:
        SecondMoment.from_sum(np.eye(2), 1, input_dtype=input_dtype)  # type: ignore[arg-type]
    assert err.value.argument == "input_dtype"


def test_numpy_integer_count() -> None:
    assert SecondMoment.from_sum(np.eye(2), np.int64(12)).count == 12
