"""Tensors to disk: one safetensors file with string metadata, written atomically (``StorageError`` on
failure, nothing left behind)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from eamet.base.errors import StorageError
from eamet.base.files import atomic_write, new_file_mode

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_save_tensors"]


def atomic_save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Writes ``tensors`` (moved to the CPU, made contiguous) and string ``metadata`` as one safetensors
    file, atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(cpu, os.fspath(tmp), metadata=dict(metadata))
        except SafetensorError as exc:  # its I/O failures (a full disk) are not OSErrors
            raise StorageError(f"{path}: cannot write ({exc})", path=str(path)) from exc
        tmp.chmod(new_file_mode())  # safetensors creates its files 0600: give them a usual file's mode

    return atomic_write(path, write)
