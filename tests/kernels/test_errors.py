"""Every bad input raises its named error class, naming the argument (and the first bad row); errors
keep their attributes through pickling."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

import eamet
from eamet import _core
from eamet.base.errors import (
    CacheError,
    DTypeError,
    EametError,
    EmptyError,
    MissingDependencyError,
    NonFiniteError,
    ParameterError,
    ShapeError,
    ZeroNormError,
)

ALL_ERRORS = [
    EametError,
    ShapeError,
    EmptyError,
    DTypeError,
    NonFiniteError,
    ZeroNormError,
    ParameterError,
    CacheError,
    MissingDependencyError,
]


def good(rng: np.random.Generator, n: int = 10, d: int = 4) -> np.ndarray:
    """A valid (n, d) float64 input."""
    return rng.normal(size=(n, d))


def test_error_hierarchy() -> None:
    """Each error is an EametError and the built-in class a caller would catch."""
    assert all(issubclass(cls, EametError) for cls in ALL_ERRORS)
    assert issubclass(ShapeError, ValueError) and issubclass(EmptyError, ShapeError)
    assert issubclass(DTypeError, TypeError)
    assert issubclass(NonFiniteError, ValueError) and issubclass(ZeroNormError, ValueError)
    assert issubclass(ParameterError, ValueError) and issubclass(CacheError, ValueError)
    assert issubclass(MissingDependencyError, ImportError)
    e = EametError("plain")
    assert (e.argument, e.row, e.path) == (None, None, None)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_errors_survive_pickling_with_attributes(cls: type[EametError]) -> None:
    """pickle round trips keep the class, message, argument, row and path (multiprocessing and
    DataLoader workers send exceptions through pickle)."""
    error = cls("something went wrong", argument="keys", row=7, path="/data/c.safetensors")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == "something went wrong"
    assert (back.argument, back.row, back.path) == ("keys", 7, "/data/c.safetensors")


def test_errors_raised_by_the_core_pickle(rng: np.random.Generator) -> None:
    """An error built by the Rust core (not by Python code) pickles with its attributes too."""
    keys = good(rng)
    keys[4, 1] = np.nan
    with pytest.raises(NonFiniteError) as info:
        eamet.misalignment(keys, good(rng))
    back = pickle.loads(pickle.dumps(info.value))
    assert (type(back), back.argument, back.row, str(back)) == (
        NonFiniteError,
        "keys",
        4,
        str(info.value),
    )


def test_different_number_of_rows(rng: np.random.Generator) -> None:
    """Keys and residuals of different N: ShapeError naming ``residuals`` and both counts."""
    with pytest.raises(ShapeError) as info:
        eamet.misalignment(good(rng, 10), good(rng, 9))
    assert info.value.argument == "residuals"
    assert "9" in str(info.value) and "10" in str(info.value)


@pytest.mark.parametrize("shape", [(10,), (2, 5, 4), ()], ids=["1-D", "3-D", "0-D"])
@pytest.mark.parametrize("which", ["keys", "residuals"])
def test_inputs_must_be_two_dimensional(rng: np.random.Generator, shape: tuple[int, ...], which: str) -> None:
    """Arrays that are not 2-D raise ShapeError naming the argument."""
    args = {"keys": good(rng), "residuals": good(rng)}
    args[which] = rng.normal(size=shape)
    with pytest.raises(ShapeError) as info:
        eamet.misalignment(args["keys"], args["residuals"])
    assert info.value.argument == which
    assert not isinstance(info.value, EmptyError)


def test_fewer_than_two_rows(rng: np.random.Generator) -> None:
    """N = 1 has no neighbours: ShapeError naming ``keys`` (``x`` for neighbors)."""
    with pytest.raises(ShapeError) as info:
        eamet.misalignment(good(rng, 1), good(rng, 1))
    assert info.value.argument == "keys"
    with pytest.raises(ShapeError) as info:
        eamet.neighbors(good(rng, 1), 3)
    assert info.value.argument == "x"


@pytest.mark.parametrize("shape", [(0, 4), (10, 0), (0, 0)])
@pytest.mark.parametrize("which", ["keys", "residuals"])
def test_empty_arrays(rng: np.random.Generator, shape: tuple[int, int], which: str) -> None:
    """Arrays with no rows or no columns raise EmptyError naming the argument."""
    args = {"keys": good(rng), "residuals": good(rng)}
    args[which] = np.zeros(shape)
    with pytest.raises(EmptyError) as info:
        eamet.misalignment(args["keys"], args["residuals"])
    assert info.value.argument == which
    with pytest.raises(EmptyError) as info:
        eamet.neighbors(np.zeros((5, 0)), 2)
    assert info.value.argument == "x"


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["keys", "residuals"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_non_finite_values_name_the_first_bad_row(
    rng: np.random.Generator, bad_value: float, which: str, dtype: type
) -> None:
    """NaN/Inf raise NonFiniteError whose .row is the FIRST bad row (not the first found by a thread)
    and whose .argument is the array holding it."""
    n = 3000
    args = {"keys": good(rng, n).astype(dtype), "residuals": good(rng, n).astype(dtype)}
    args[which][2900, 0] = np.nan
    args[which][1700, 3] = bad_value
    args[which][1234, 2] = bad_value
    with pytest.raises(NonFiniteError) as info:
        eamet.misalignment(args["keys"], args["residuals"])
    assert (info.value.argument, info.value.row) == (which, 1234)
    assert "row 1234" in str(info.value) and which in str(info.value)


def test_non_finite_row_is_counted_in_the_view(rng: np.random.Generator) -> None:
    """For a strided view, .row is the row of the view that was passed, not of its base array."""
    base = good(rng, 40)
    base[14, 0] = np.inf  # row 7 of base[::2]
    with pytest.raises(NonFiniteError) as info:
        eamet.misalignment(base[::2], good(rng, 20))
    assert (info.value.argument, info.value.row) == ("keys", 7)
    with pytest.raises(NonFiniteError) as info:
        eamet.neighbors(base[::2], 3)
    assert (info.value.argument, info.value.row) == ("x", 7)


def test_non_finite_torch_tensor() -> None:
    """Torch inputs report bad rows the same way."""
    import torch

    keys = torch.randn(30, 5)
    keys[11, 2] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        eamet.misalignment(torch.randn(30, 4), keys.to(torch.bfloat16))
    assert (info.value.argument, info.value.row) == ("residuals", 11)


@pytest.mark.parametrize("which", ["keys", "residuals"])
def test_zero_norm_row(rng: np.random.Generator, which: str) -> None:
    """An all-zero row has no direction: ZeroNormError with .row and .argument."""
    args = {"keys": good(rng, 50), "residuals": good(rng, 50)}
    args[which][31] = 0.0
    args[which][44] = 0.0
    with pytest.raises(ZeroNormError) as info:
        eamet.misalignment(args["keys"], args["residuals"])
    assert (info.value.argument, info.value.row) == (which, 31)
    assert "31" in str(info.value)
    with pytest.raises(ZeroNormError) as info:
        eamet.neighbors(args[which], 4)
    assert (info.value.argument, info.value.row) == ("x", 31)


@pytest.mark.parametrize(
    "tau",
    [0, 0.0, -0.07, float("nan"), float("inf"), -float("inf"), "0.07", None, True, 1e-50],
    ids=repr,
)
def test_bad_tau(rng: np.random.Generator, tau: Any) -> None:
    """tau must be a finite real > 0 (and 1/tau must fit float32): ParameterError naming ``tau``."""
    with pytest.raises(ParameterError) as info:
        eamet.misalignment(good(rng), good(rng), tau=tau)
    assert info.value.argument == "tau"
    assert "tau" in str(info.value)


@pytest.mark.parametrize("top_m", [0, -1, 1.5, 2.0, "3", None, True], ids=repr)
def test_bad_top_m(rng: np.random.Generator, top_m: Any) -> None:
    """top_m must be an integer >= 1: ParameterError naming ``top_m`` (misalignment and neighbors)."""
    with pytest.raises(ParameterError) as info:
        eamet.misalignment(good(rng), good(rng), top_m=top_m)
    assert info.value.argument == "top_m"
    with pytest.raises(ParameterError) as info:
        eamet.neighbors(good(rng), top_m)
    assert info.value.argument == "top_m"


@pytest.mark.parametrize("top_m", [10**12, 2**64], ids=["1e12", "2**64"])
def test_huge_top_m_is_clamped(rng: np.random.Generator, top_m: int) -> None:
    """Any integer top_m >= 1 is valid and clamped to N - 1, however large (no OverflowError)."""
    assert eamet.misalignment(good(rng), good(rng), top_m=top_m).top_m == 9
    assert eamet.neighbors(good(rng), top_m)[0].shape == (10, 9)


def test_numpy_scalars_are_valid_parameters(rng: np.random.Generator) -> None:
    """numpy integers and floats are accepted for top_m and tau."""
    rep = eamet.misalignment(good(rng), good(rng), tau=np.float64(0.5), top_m=np.int64(3))
    assert (rep.top_m, rep.tau) == (3, 0.5)


@pytest.mark.parametrize(
    "dtype", [np.int64, np.int32, np.uint8, np.bool_, np.complex64, np.complex128, object]
)
@pytest.mark.parametrize("which", ["keys", "residuals"])
def test_non_float_numpy_dtypes(rng: np.random.Generator, dtype: type, which: str) -> None:
    """Integer, boolean, complex and object arrays raise DTypeError (a TypeError) naming the argument."""
    args = {"keys": good(rng), "residuals": good(rng)}
    args[which] = np.ones((10, 4), dtype=dtype)
    with pytest.raises(DTypeError) as info:
        eamet.misalignment(args["keys"], args["residuals"])
    assert info.value.argument == which
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8", "bool", "complex64"])
def test_non_float_torch_dtypes(rng: np.random.Generator, dtype: str) -> None:
    """The same for torch tensors, for misalignment, neighbors and SecondMoment.update."""
    import torch

    bad = torch.ones(10, 4, dtype=getattr(torch, dtype))
    with pytest.raises(DTypeError) as info:
        eamet.misalignment(good(rng), bad)
    assert info.value.argument == "residuals"
    with pytest.raises(DTypeError) as info:
        eamet.neighbors(bad, 2)
    assert info.value.argument == "x"
    with pytest.raises(DTypeError) as info:
        eamet.SecondMoment(4).update(bad)
    assert info.value.argument == "batch"


@pytest.mark.parametrize(
    "value",
    [[["a", "b"], ["c", "d"]], [[1.0], [1.0, 2.0]], "text", None],
    ids=["strings", "ragged", "str", "None"],
)
def test_values_that_are_not_arrays(rng: np.random.Generator, value: Any) -> None:
    """Things that are not float arrays at all (strings, ragged lists, None) raise DTypeError."""
    with pytest.raises(DTypeError) as info:
        eamet.misalignment(value, good(rng))
    assert info.value.argument == "keys"


def test_lists_of_lists_work_like_arrays(rng: np.random.Generator) -> None:
    """Nested Python lists are read as the array they spell."""
    keys, residuals = good(rng, 12, 3), good(rng, 12, 5)
    from_lists = eamet.misalignment(keys.tolist(), residuals.tolist(), top_m=4)
    from_arrays = eamet.misalignment(keys, residuals, top_m=4)
    np.testing.assert_allclose(from_lists.scores, from_arrays.scores, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(from_lists.key_neighbors, from_arrays.key_neighbors)
    idx, _ = eamet.neighbors(keys.tolist(), 4)
    np.testing.assert_array_equal(idx, from_arrays.key_neighbors)
    acc = eamet.SecondMoment(3)
    acc.update(keys.tolist())
    np.testing.assert_allclose(acc.moment(), keys.T @ keys / 12, rtol=1e-12)


def test_worst_rejects_negative_k(rng: np.random.Generator) -> None:
    """report.worst(-1) raises ParameterError naming ``k``."""
    rep = eamet.misalignment(good(rng), good(rng))
    with pytest.raises(ParameterError) as info:
        rep.worst(-1)
    assert info.value.argument == "k"


def test_core_level_parameters(rng: np.random.Generator) -> None:
    """The core checks its own arguments: a negative tile size, a non-array input, a negative thread
    count."""
    x = good(rng)
    with pytest.raises(ParameterError) as info:
        _core.misalignment(x, x, tau=0.07, top_m=3, progressive=False, block=-1)
    assert info.value.argument == "block"
    with pytest.raises(ParameterError) as info:
        _core.misalignment(x, x, tau=0.07, top_m=0, progressive=False)
    assert info.value.argument == "top_m"
    with pytest.raises(DTypeError) as info:
        _core.misalignment(x.tolist(), x, tau=0.07, top_m=3, progressive=False)
    assert info.value.argument == "keys"
    with pytest.raises(ParameterError) as info:
        eamet.set_num_threads(-1)
    assert info.value.argument == "n"
