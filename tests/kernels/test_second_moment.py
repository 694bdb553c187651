"""SecondMoment against numpy: float64/float32 batches, chunking, layouts, torch, errors that leave the
accumulator unchanged, merge, and the checksummed file format.

Tolerances: float64 batches are multiplied in float64, so each entry is within a few n·2^-53 of
|X|^T|X| / n (1e-12 of it is a wide margin for the sizes here). float32 batches are multiplied in float32
in chunks of at most 2048 rows: the classical bound for an n-term dot product gives
|error| <= (min(n, 2048) + 2)·2^-24·(|X|^T|X|)_ij / count; the float64 sum of chunks adds nothing visible.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import eamet
from eamet import SecondMoment
from eamet.base.errors import CacheError, DTypeError, EmptyError, NonFiniteError, ParameterError, ShapeError

U32 = 2.0**-24


def magnitude(x: np.ndarray) -> np.ndarray:
    """|X|^T |X| / n in float64: the scale rounding errors of X^T X / n are measured against."""
    a = np.abs(x.astype(np.float64))
    return a.T @ a / x.shape[0]


def reference(x: np.ndarray) -> np.ndarray:
    """X^T X / n in float64 of exactly the values of ``x``."""
    v = x.astype(np.float64)
    return v.T @ v / x.shape[0]


def filled(rng: np.random.Generator, dim: int, rows: int, dtype: type = np.float64) -> SecondMoment:
    """An accumulator fed one random batch."""
    acc = SecondMoment(dim)
    acc.update(rng.normal(size=(rows, dim)).astype(dtype))
    return acc


def test_float64_batch_matches_numpy(rng: np.random.Generator) -> None:
    """A float64 batch gives X^T X / n to float64 rounding; the result is exactly symmetric."""
    x = rng.normal(size=(500, 70)) * rng.uniform(0.1, 10, size=70)
    acc = SecondMoment(70)
    acc.update(x)
    got = acc.moment()
    assert got.shape == (70, 70) and got.dtype == np.float64
    assert np.all(np.abs(got - reference(x)) <= 1e-12 * magnitude(x))
    np.testing.assert_array_equal(got, got.T)
    assert (acc.count, acc.dim, acc.input_dtype) == (500, 70, "float64")
    assert repr(acc) == "SecondMoment(dim=70, count=500, input_dtype='float64')"


def test_float32_batch_matches_float64_products_of_the_same_values(rng: np.random.Generator) -> None:
    """A float32 batch agrees with the float64 X^T X of the same float32 values within the float32
    dot-product bound (module docstring), and is much closer than that in practice."""
    x = (rng.normal(size=(700, 90)) * rng.uniform(0.1, 10, size=90)).astype(np.float32)
    acc = SecondMoment(90)
    acc.update(x)
    err = np.abs(acc.moment() - reference(x))
    assert np.all(err <= (700 + 2) * U32 * magnitude(x))
    assert acc.input_dtype == "float32"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("dim", [257, 600, 2100])
def test_dimensions_spanning_several_tiles(rng: np.random.Generator, dtype: type, dim: int) -> None:
    """Dimensions cut into several upper-triangle tiles (256 wide, 512 above dim 2048), with a ragged
    last tile: every entry of the full symmetric matrix is right."""
    x = rng.normal(size=(40, dim)).astype(dtype)
    acc = SecondMoment(dim)
    acc.update(x)
    got = acc.moment()
    bound = (40 + 2) * U32 if dtype == np.float32 else 1e-12
    assert np.all(np.abs(got - reference(x)) <= bound * magnitude(x))
    np.testing.assert_array_equal(got, got.T)


def test_float16_numpy_batch(rng: np.random.Generator) -> None:
    """float16 arrays are widened to float32 once: the same result as the float32 array."""
    x = rng.normal(size=(64, 9)).astype(np.float16)
    half, single = SecondMoment(9), SecondMoment(9)
    half.update(x)
    single.update(x.astype(np.float32))
    np.testing.assert_array_equal(half.moment(), single.moment())
    assert half.input_dtype == "float32"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_more_than_2048_rows_are_chunked(rng: np.random.Generator, dtype: type) -> None:
    """Batches longer than one 2048-row chunk are complete (every row counted once) and equal, bit for
    bit, the same rows fed as separate 2048-row batches."""
    rows, dim = 2 * 2048 + 37, 33
    x = rng.normal(size=(rows, dim)).astype(dtype)
    whole = SecondMoment(dim)
    whole.update(x)
    assert whole.count == rows
    bound = (2048 + 2) * U32 if dtype == np.float32 else 1e-12
    assert np.all(np.abs(whole.moment() - reference(x)) <= bound * magnitude(x))
    pieces = SecondMoment(dim)
    for start in range(0, rows, 2048):
        pieces.update(x[start : start + 2048])
    np.testing.assert_array_equal(whole.moment(), pieces.moment())
    # a strided view of the same rows is copied chunk by chunk: still the same sums
    strided = SecondMoment(dim)
    strided.update(np.asfortranarray(x))
    np.testing.assert_array_equal(whole.moment(), strided.moment())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_non_contiguous_batches(rng: np.random.Generator, dtype: type) -> None:
    """Transposed, strided and reversed views give exactly the result of a contiguous copy."""
    dim = 21
    views = [
        np.ascontiguousarray(rng.normal(size=(dim, 300)).astype(dtype)).T,
        rng.normal(size=(900, 2 * dim)).astype(dtype)[::3, ::2],
        rng.normal(size=(300, dim)).astype(dtype)[::-1],
    ]
    for view in views:
        assert not view.flags.c_contiguous
        strided, copied = SecondMoment(dim), SecondMoment(dim)
        strided.update(view)
        copied.update(np.ascontiguousarray(view))
        np.testing.assert_array_equal(strided.moment(), copied.moment())
        assert np.all(np.abs(strided.moment() - reference(view)) <= 302 * U32 * magnitude(view))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_torch_cpu_tensor_batches(rng: np.random.Generator, dtype: str) -> None:
    """CPU torch tensors (contiguous, transposed, requiring grad) give exactly the result of the numpy
    array of their values (float16/bfloat16 are widened to float32)."""
    import torch

    x = rng.normal(size=(200, 17))
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    values = t.numpy() if dtype in ("float32", "float64") else t.to(torch.float32).numpy()
    for tensor in (t, t.t().contiguous().t(), t.clone().requires_grad_(True)):
        from_torch, from_numpy = SecondMoment(17), SecondMoment(17)
        from_torch.update(tensor)
        from_numpy.update(values)
        np.testing.assert_array_equal(from_torch.moment(), from_numpy.moment())
        assert from_torch.input_dtype == ("float64" if dtype == "float64" else "float32")


def test_empty_batch_is_a_no_op(rng: np.random.Generator) -> None:
    """A (0, dim) batch changes neither the count, the sum, nor the recorded input dtype."""
    acc = SecondMoment(6)
    acc.update(np.empty((0, 6)))
    assert (acc.count, acc.input_dtype) == (0, "none")
    acc.update(rng.normal(size=(10, 6)).astype(np.float32))
    before = acc.moment()
    acc.update(np.empty((0, 6), dtype=np.float64))
    assert (acc.count, acc.input_dtype) == (10, "float32")
    np.testing.assert_array_equal(acc.moment(), before)


def test_moment_of_an_empty_accumulator_raises() -> None:
    """moment() with no rows is undefined: EmptyError (a ShapeError and a ValueError)."""
    with pytest.raises(EmptyError) as info:
        SecondMoment(4).moment()
    assert isinstance(info.value, ShapeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("dim", [0, -3])
def test_dimension_must_be_positive(dim: int) -> None:
    """SecondMoment(dim < 1) raises ParameterError naming ``dim``."""
    with pytest.raises(ParameterError) as info:
        SecondMoment(dim)
    assert info.value.argument == "dim"


def test_save_load_round_trip_is_bit_exact(rng: np.random.Generator, tmp_path: Path) -> None:
    """save/load keeps the sum bit for bit, the count, dim, input dtype and the metadata dict; the
    loaded accumulator keeps accumulating like the original."""
    acc = filled(rng, 13, 40, np.float32)
    acc.update(rng.normal(size=(5, 13)))
    meta = {"layer": 17, "model": "gpt-ü", "nested": {"ids": [1, 2, 3], "scale": 0.5, "none": None}}
    path = tmp_path / "c.safetensors"
    acc.save(path, metadata=meta)
    assert acc.metadata == meta
    back = SecondMoment.load(path)
    assert isinstance(back, SecondMoment)
    assert (back.dim, back.count, back.input_dtype) == (13, 45, "mixed")
    assert back.metadata == meta
    np.testing.assert_array_equal(back.moment(), acc.moment())
    more = rng.normal(size=(7, 13))
    acc.update(more)
    back.update(more)
    np.testing.assert_array_equal(back.moment(), acc.moment())


def test_save_uses_the_metadata_attribute_by_default(rng: np.random.Generator, tmp_path: Path) -> None:
    """Without a metadata argument, save() writes ``acc.metadata``; an empty accumulator round-trips."""
    acc = filled(rng, 3, 4)
    acc.metadata = {"source": "wikitext", "samples": 4}
    acc.save(str(tmp_path / "a.st"))
    assert SecondMoment.load(str(tmp_path / "a.st")).metadata == {"source": "wikitext", "samples": 4}
    SecondMoment(5).save(tmp_path / "empty.st")
    empty = SecondMoment.load(tmp_path / "empty.st")
    assert (empty.dim, empty.count, empty.input_dtype, empty.metadata) == (5, 0, "none", {})
    with pytest.raises(EmptyError):
        empty.moment()


def test_save_is_atomic(rng: np.random.Generator, tmp_path: Path) -> None:
    """save writes through a temporary file and a rename: afterwards only the target exists, an
    existing file is replaced whole, and a failed save leaves no temporary file behind."""
    path = tmp_path / "m.safetensors"
    first = filled(rng, 8, 20)
    first.save(path)
    assert names(tmp_path) == ["m.safetensors"]
    second = filled(rng, 8, 30)
    second.save(path)
    assert names(tmp_path) == ["m.safetensors"]
    np.testing.assert_array_equal(SecondMoment.load(path).moment(), second.moment())
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(OSError):
        second.save(tmp_path / "a-directory")
    assert names(tmp_path) == ["a-directory", "m.safetensors"]
    assert names(tmp_path / "a-directory") == []


def names(folder: Path) -> list[str]:
    """The sorted names of everything in ``folder`` (hidden temporary files included)."""
    return sorted(p.name for p in folder.iterdir())


def saved_bytes(rng: np.random.Generator, tmp_path: Path) -> tuple[Path, bytes]:
    """A valid saved file and its bytes."""
    path = tmp_path / "m.safetensors"
    filled(rng, 12, 30).save(path, metadata={"k": 1})
    return path, path.read_bytes()


def test_flipped_byte_is_a_checksum_error(rng: np.random.Generator, tmp_path: Path) -> None:
    """One flipped bit in the data (near the end of the file) is caught by the CRC-32: CacheError naming
    the file and the checksum."""
    path, data = saved_bytes(rng, tmp_path)
    corrupt = bytearray(data)
    corrupt[-3] ^= 0x40
    path.write_bytes(bytes(corrupt))
    with pytest.raises(CacheError, match="checksum") as info:
        SecondMoment.load(path)
    assert info.value.path == str(path)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["truncated-data", "truncated-header", "empty", "random-bytes"])
def test_damaged_files_are_cache_errors(rng: np.random.Generator, tmp_path: Path, damage: str) -> None:
    """Truncated, empty and random files raise CacheError naming the file (never a crash or garbage)."""
    path, data = saved_bytes(rng, tmp_path)
    content = {
        "truncated-data": data[:-8],
        "truncated-header": data[:40],
        "empty": b"",
        "random-bytes": rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes(),
    }[damage]
    path.write_bytes(content)
    with pytest.raises(CacheError) as info:
        SecondMoment.load(path)
    assert info.value.path == str(path)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    """A path that does not exist raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError) as info:
        SecondMoment.load(tmp_path / "nope.safetensors")
    assert info.value.filename == str(tmp_path / "nope.safetensors")


def safetensors_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> None:
    """Writes a safetensors file by hand (8-byte header length, JSON header, raw little-endian data)."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype="<f8").tobytes()
        header[name] = {
            "dtype": "F64",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def valid_metadata(dim: int, data: np.ndarray, **changes: str) -> dict[str, str]:
    """The metadata a SecondMoment file of ``dim`` holding ``data`` carries, with ``changes`` applied."""
    meta = {
        "format": "eamet.SecondMoment",
        "format_version": "1",
        "dim": str(dim),
        "count": "3",
        "input_dtype": "float64",
        "accumulator_dtype": "float64",
        "layout": "upper-triangle-packed-row-major",
        "crc32": f"{zlib.crc32(data.astype('<f8').tobytes()):08x}",
    }
    meta.update(changes)
    return meta


def test_hand_written_file_loads(tmp_path: Path) -> None:
    """The format is what the docs say: the packed upper triangle (row-major, float64), dim, count,
    input dtype and a CRC-32 in the safetensors metadata."""
    packed = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # upper triangle of a 3x3 sum
    path = tmp_path / "hand.safetensors"
    safetensors_file(path, {"sum_upper": packed}, valid_metadata(3, packed, metadata='{"a": [1]}'))
    acc = SecondMoment.load(path)
    sums = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    np.testing.assert_allclose(acc.moment(), sums / 3, rtol=1e-15, atol=0)
    assert (acc.count, acc.input_dtype, acc.metadata) == (3, "float64", {"a": [1]})


@pytest.mark.parametrize(
    "case",
    ["no-metadata", "other-format", "future-version", "wrong-length", "bad-count", "not-json", "not-a-dict"],
)
def test_foreign_or_inconsistent_files_are_cache_errors(tmp_path: Path, case: str) -> None:
    """Valid safetensors files that are not intact SecondMoment files raise CacheError."""
    packed = np.arange(6.0)
    tensors = {"sum_upper": packed}
    meta: dict[str, str] | None = valid_metadata(3, packed)
    if case == "no-metadata":
        meta = None
    elif case == "other-format":
        meta = valid_metadata(3, packed, format="something.else")
    elif case == "future-version":
        meta = valid_metadata(3, packed, format_version="99")
    elif case == "wrong-length":
        meta = valid_metadata(4, packed)  # dim 4 needs 10 packed values
    elif case == "bad-count":
        meta = valid_metadata(3, packed, count="-1")
    elif case == "not-json":
        meta = valid_metadata(3, packed, metadata="{not json")
    elif case == "not-a-dict":
        meta = valid_metadata(3, packed, metadata="[1, 2]")
    path = tmp_path / f"{case}.safetensors"
    safetensors_file(path, tensors, meta)
    with pytest.raises(CacheError) as info:
        SecondMoment.load(path)
    assert info.value.path == str(path)


def test_wrong_dim_batch_is_rejected_and_changes_nothing(rng: np.random.Generator) -> None:
    """A batch of the wrong width (or not 2-D) raises ShapeError naming ``batch``; count and sum stay."""
    acc = filled(rng, 5, 9)
    before = acc.moment()
    for bad in (np.ones((4, 6)), np.ones((4, 4)), np.ones(5), np.ones((2, 5, 1))):
        with pytest.raises(ShapeError) as info:
            acc.update(bad)
        assert info.value.argument == "batch"
    assert acc.count == 9
    np.testing.assert_array_equal(acc.moment(), before)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_non_finite_batch_names_the_first_bad_row(
    rng: np.random.Generator, bad_value: float, dtype: type
) -> None:
    """NaN/Inf raise NonFiniteError with .row = the first bad row (also past the first 2048-row chunk)
    and leave the accumulator unchanged."""
    acc = filled(rng, 4, 7)
    before = acc.moment()
    for first, later in ((3, 5), (2500, 4000)):
        x = rng.normal(size=(4100, 4)).astype(dtype)
        x[later, 0] = np.nan
        x[first, 2] = bad_value
        with pytest.raises(NonFiniteError) as info:
            acc.update(x)
        assert (info.value.row, info.value.argument) == (first, "batch")
        assert str(first) in str(info.value)
    assert (acc.count, acc.input_dtype) == (7, "float64")
    np.testing.assert_array_equal(acc.moment(), before)


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.bool_, np.complex128])
def test_non_float_batch_is_a_dtype_error(dtype: type) -> None:
    """Integer, boolean and complex batches raise DTypeError naming ``batch``."""
    acc = SecondMoment(3)
    with pytest.raises(DTypeError) as info:
        acc.update(np.ones((2, 3), dtype=dtype))
    assert info.value.argument == "batch"
    assert acc.count == 0


def test_merge_checks_its_argument(rng: np.random.Generator) -> None:
    """Merging a different dim raises ShapeError; merging something that is not a SecondMoment (even the
    core's own object) raises DTypeError; neither changes the accumulator."""
    acc = filled(rng, 4, 10)
    before = acc.moment()
    with pytest.raises(ShapeError):
        acc.merge(filled(rng, 5, 3))
    for other in (np.eye(4), "acc", acc._acc):
        with pytest.raises(DTypeError) as info:
            acc.merge(other)  # type: ignore[arg-type]
        assert info.value.argument == "other"
    assert acc.count == 10
    np.testing.assert_array_equal(acc.moment(), before)


def test_merge_with_itself_doubles_sum_and_count(rng: np.random.Generator) -> None:
    """acc.merge(acc) adds the sum to itself exactly once: count doubles, the sum doubles, the moment
    (sum / count) is unchanged."""
    acc = filled(rng, 6, 11, np.float32)
    before = acc.moment() * acc.count
    acc.merge(acc)
    assert (acc.count, acc.input_dtype) == (22, "float32")
    np.testing.assert_array_equal(acc.moment() * acc.count, 2 * before)


def test_merge_of_empty_and_loaded_accumulators(rng: np.random.Generator, tmp_path: Path) -> None:
    """Merging an empty accumulator changes nothing; a loaded one merges like the original."""
    acc = filled(rng, 5, 8)
    before = acc.moment()
    acc.merge(SecondMoment(5))
    assert acc.count == 8 and acc.input_dtype == "float64"
    np.testing.assert_array_equal(acc.moment(), before)
    acc.save(tmp_path / "x.st")
    twice = SecondMoment.load(tmp_path / "x.st")
    twice.merge(acc)
    assert twice.count == 16
    np.testing.assert_array_equal(twice.moment(), before)


def test_top_level_exports() -> None:
    """The accumulator is the one exported at the top level."""
    assert eamet.SecondMoment is SecondMoment


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file"])
def test_save_failure_is_a_storage_error_naming_the_path(tmp_path: Path, where: str) -> None:
    from eamet.base.errors import StorageError

    acc = SecondMoment(4)
    acc.update(np.eye(4, dtype=np.float32))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = tmp_path / "no" / "m.safetensors" if where == "missing-dir" else blocker / "m.safetensors"
    with pytest.raises(StorageError, match="cannot write") as info:
        acc.save(target, metadata={"layer": 1})
    assert isinstance(info.value, OSError) and info.value.path == str(target)
    assert acc.metadata != {"layer": 1}  # a failed save changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
