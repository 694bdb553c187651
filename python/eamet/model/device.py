"""Where and in which dtype the editing work runs: the residual step's compute dtype (``z_dtype``) and the
device of the solve. One policy for every caller."""

from __future__ import annotations

import torch

__all__ = ["resolve_z_dtype", "solve_device"]


def resolve_z_dtype(z_dtype: str, device: torch.device) -> torch.dtype:
    """The residual step's compute dtype on ``device`` for a ``config.z_dtype`` setting.

    ``auto`` is bfloat16 where it is fast — CUDA devices that support it, CPUs with AMX tiles (there torch's
    bfloat16 matrix products run several times faster than float32) — and float32 elsewhere (on CPUs
    without AMX, bfloat16 products measured slower than float32: docs/benchmarks.md).
    """
    if z_dtype == "float32":
        return torch.float32
    if z_dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    return torch.float32


def solve_device(device: torch.device) -> torch.device:
    """Where float64 work for a model on ``device`` runs: the device itself, the CPU for Apple's MPS
    (no float64 there)."""
    return torch.device("cpu") if device.type == "mps" else device
