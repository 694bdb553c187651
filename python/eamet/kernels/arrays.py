"""Turn user arrays (numpy, torch, array-likes) into what the Rust core reads, converting at most once.

float32 and float64 numpy arrays pass through untouched, whatever their strides: the core reads them
in place and its row normalisation is the only copy. Other float types are converted once (to
float32, or float64 for extended precision). Torch tensors never require importing torch: CPU
float32/float64 tensors are viewed zero-copy, anything else (CUDA, float16, bfloat16) is moved and
cast in a single ``.to()``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from eamet.base.errors import DTypeError

__all__ = ["as_float_matrix", "is_torch_tensor"]


def is_torch_tensor(x: Any) -> bool:
    """True for a ``torch.Tensor`` (checked without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _from_torch(x: Any, argument: str) -> np.ndarray:
    torch = sys.modules["torch"]
    t = x.detach()
    if t.is_complex() or not t.is_floating_point():
        raise DTypeError(
            f"{argument}: tensor dtype {t.dtype} is not supported; pass floating-point values",
            argument=argument,
        )
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return np.asarray(t.numpy())  # zero-copy view, strides preserved
    target = torch.float64 if t.dtype == torch.float64 else torch.float32
    return np.asarray(t.to(device="cpu", dtype=target).numpy())


def as_float_matrix(x: Any, argument: str) -> np.ndarray:
    """Returns ``x`` as a float32 or float64 numpy array, converting it at most once.

    Args:
        x: numpy array, torch tensor (any device, any float dtype, any strides) or array-like.
        argument: name used in error messages (``"keys"``, ``"batch"`` ...).

    Returns:
        A numpy array of dtype float32 or float64 with the same shape as ``x``; a view when possible.
        Dimensions are checked by the core, which names ``argument`` in its ``ShapeError``.

    Raises:
        DTypeError: integer, boolean, complex or non-numeric values.
    """
    if is_torch_tensor(x):
        return _from_torch(x, argument)
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise DTypeError(f"{argument}: cannot read as an array ({exc})", argument=argument) from exc
    if x.dtype in (np.float32, np.float64):
        return np.asarray(x)
    if x.dtype.kind == "f":
        # float16 widens to float32; extended precision narrows to float64.
        return np.asarray(x.astype(np.float32 if x.dtype.itemsize < 4 else np.float64))
    raise DTypeError(
        f"{argument}: dtype {x.dtype} is not supported; pass floating-point values",
        argument=argument,
    )
