"""``SecondMoment``: a streaming, mergeable float64 accumulator of Σ x xᵀ (the Rust core's), with a
self-describing file format. MEMIT and EAMET use C = E[k kᵀ] of an MLP projection's inputs.
"""

from __future__ import annotations

import json
import numbers
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from eamet import _core
from eamet.base.errors import CacheError, DTypeError, ParameterError, StorageError
from eamet.kernels.arrays import as_float_matrix

__all__ = ["SecondMoment"]


class SecondMoment:
    """Accumulates Σ x xᵀ over rows x of dimension ``dim`` in float64.

    Only the upper triangle is computed (half the flops of ``X.T @ X``); float32 batches are multiplied
    in float32 in chunks of 2048 rows, each chunk added into the float64 sum. The GIL is released
    during :meth:`update`, so a data-loading thread can run meanwhile; calls from several threads on
    one accumulator are serialised by a lock.

    Example:
        >>> acc = SecondMoment(4)
        >>> acc.update(np.ones((3, 4), dtype=np.float32))
        >>> acc.count, float(acc.moment()[0, 0])
        (3, 1.0)

    Attributes:
        metadata: free-form JSON-serialisable settings saved with the file (what made the statistic).
    """

    def __init__(self, dim: int) -> None:
        """Creates an empty accumulator for rows of dimension ``dim`` (>= 1); allocates dim² float64."""
        self._acc = _core.SecondMoment(dim)
        self._lock = threading.Lock()
        self.metadata: dict[str, Any] = {}

    @classmethod
    def from_sum(
        cls,
        total: Any,
        count: int,
        *,
        input_dtype: str = "float32",
        metadata: Mapping[str, Any] | None = None,
    ) -> SecondMoment:
        """An accumulator holding an already-accumulated Σ x xᵀ, e.g. summed on a GPU, so that it can
        be merged with others and saved in the same file format.

        Args:
            total: (dim, dim) Σ x xᵀ over ``count`` rows, numpy array or torch tensor (any device);
                float64 is kept as is, float32 widened. Only the upper triangle (diagonal included) is
                read, as :meth:`update` keeps it; it need not be exactly symmetric. Must be finite.
            count: number of rows summed into ``total`` (>= 1).
            input_dtype: element type of those rows: ``"float32"``, ``"float64"`` or ``"mixed"``.
            metadata: initial :attr:`metadata` (default: empty).

        Raises:
            ShapeError: ``total`` not 2-D or not square.  NonFiniteError: names the first bad row.
            ParameterError: ``count`` outside [1, 2**63) or ``input_dtype`` unknown.  DTypeError: non-float
                values.
        """
        # Types only: the core checks the ranges (count in [1, 2**63), a known input_dtype).
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise ParameterError(f"count: must be an integer, got {count!r}", argument="count")
        if not isinstance(input_dtype, str):
            raise ParameterError(
                f"input_dtype: must be a string, got {input_dtype!r}", argument="input_dtype"
            )
        array = as_float_matrix(total, "total")
        return cls._wrap(_core.SecondMoment.from_sum(array, int(count), input_dtype), dict(metadata or {}))

    @classmethod
    def _wrap(cls, acc: _core.SecondMoment, metadata: dict[str, Any]) -> SecondMoment:
        obj = cls.__new__(cls)
        obj._acc = acc
        obj._lock = threading.Lock()
        obj.metadata = metadata
        return obj

    @property
    def dim(self) -> int:
        """Row dimension."""
        return self._acc.dim

    @property
    def count(self) -> int:
        """Number of rows accumulated."""
        return self._acc.count

    @property
    def input_dtype(self) -> str:
        """``"float32"``, ``"float64"``, ``"mixed"`` or ``"none"``: the batches' element types."""
        return self._acc.input_dtype

    def update(self, batch: Any) -> None:
        """Adds the rows of ``batch``: (n, dim) numpy array or torch tensor, any float dtype.

        float16/bfloat16 and non-CPU tensors are converted to float32 once. An empty batch changes
        nothing. Raises ``ShapeError`` (wrong dim, not 2-D) or ``NonFiniteError`` (first bad row),
        leaving the accumulator unchanged.
        """
        array = as_float_matrix(batch, "batch")
        with self._lock:
            self._acc.update(array)

    def merge(self, other: SecondMoment) -> None:
        """Adds another accumulator of the same ``dim`` (e.g. from another worker) into this one."""
        if not isinstance(other, SecondMoment):
            raise DTypeError(f"other: expected a SecondMoment, got {type(other).__name__}", argument="other")
        if other is self:
            with self._lock:
                self._acc.merge(self._acc)
            return
        # Lock in a fixed (id) order so that a.merge(b) and b.merge(a) in two threads cannot deadlock.
        first, second = sorted((self, other), key=id)
        with first._lock, second._lock:
            self._acc.merge(other._acc)

    def moment(self) -> np.ndarray:
        """(dim, dim) float64 symmetric matrix Σ x xᵀ / count. Raises ``EmptyError`` if count is 0."""
        with self._lock:
            return self._acc.moment()

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> None:
        """Writes a safetensors file atomically: the packed upper triangle (float64), dim, count,
        input dtype, a CRC-32 of the data, and ``metadata`` (default: :attr:`metadata`) as JSON.

        Raises ``StorageError`` (an ``OSError``) naming ``path`` when it cannot be written (no such
        directory, full disk, no permission); nothing is left behind.
        """
        meta = dict(self.metadata if metadata is None else metadata)
        try:
            with self._lock:
                self._acc.save(os.fspath(path), json.dumps(meta, sort_keys=True))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StorageError(f"{path}: cannot write ({reason})", path=os.fspath(path)) from exc
        self.metadata = meta

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SecondMoment:
        """Reads a file written by :meth:`save`. Raises ``CacheError`` for a truncated, corrupt or
        foreign file and ``OSError`` (e.g. ``FileNotFoundError``) when it cannot be read.
        """
        acc, meta_json = _core.SecondMoment.load(os.fspath(path))
        try:
            meta = json.loads(meta_json) if meta_json else {}
        except json.JSONDecodeError as exc:
            raise CacheError(f"{path}: metadata is not valid JSON ({exc})", path=str(path)) from exc
        if not isinstance(meta, dict):
            raise CacheError(f"{path}: metadata is not a JSON object", path=str(path))
        return cls._wrap(acc, meta)

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count}, input_dtype='{self.input_dtype}')"
