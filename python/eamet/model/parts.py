"""``ModelParts``: the modules of one model that an edit touches, resolved through the registry; the
weight snapshot that puts them back; and the model-mode context every pass runs in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn

from eamet.base.arch import ArchSpec, arch_for
from eamet.base.errors import UnsupportedArchitectureError

__all__ = ["ModelParts", "WeightSnapshot", "eval_mode", "tensor_sha256"]


class ModelParts:
    """Resolves the registry's dotted paths on ``model`` once and checks them.

    Args:
        model: a ``transformers`` causal LM.
        spec: module paths; default: the registry entry for ``model.config.model_type``.

    Raises ``UnsupportedArchitectureError`` when the family is unknown, a path does not exist, or the
    rewrite module's type does not match the declared weight layout.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None) -> None:
        self.model = model
        self.spec = spec if spec is not None else arch_for(model)
        self.model_type = str(getattr(getattr(model, "config", None), "model_type", "unknown"))
        blocks = self._get(self.spec.blocks)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise UnsupportedArchitectureError(
                f"{self.spec.blocks} is a {type(blocks).__name__}, not a list of blocks"
            )
        self.blocks = blocks
        self.num_layers = len(blocks)
        # Resolving the last block checks every relative path once for all blocks of the model.
        self.check_rewrite(self.num_layers - 1)
        self.final_norm = self._get(self.spec.final_norm)
        self.unembed = self._get(self.spec.unembed)

    def _get(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"{self.model_type}: the model has no module {path!r} (check its ArchSpec)"
            ) from None

    def block(self, layer: int) -> nn.Module:
        """The transformer block ``layer`` (0-based)."""
        if not 0 <= layer < self.num_layers:
            raise UnsupportedArchitectureError(
                f"layer {layer} is out of range: the model has {self.num_layers} blocks"
            )
        module = self.blocks[layer]
        assert isinstance(module, nn.Module)
        return module

    def rewrite(self, layer: int) -> nn.Module:
        """The edited MLP output projection of block ``layer``; its input is the key."""
        self.block(layer)  # range check with a clear message
        return self._get(self.spec.rewrite_path(layer))

    def check_rewrite(self, layer: int) -> None:
        """Checks that the rewrite module of ``layer`` exists and that its type fits the declared layout."""
        module = self.rewrite(layer)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise UnsupportedArchitectureError(f"{self.spec.rewrite_path(layer)} has no 2-D weight")
        is_linear = isinstance(module, nn.Linear)
        if (self.spec.weight_layout == "out_in") != is_linear:
            raise UnsupportedArchitectureError(
                f"{self.spec.rewrite_path(layer)} is a {type(module).__name__}, but the ArchSpec declares "
                f"weight_layout={self.spec.weight_layout!r} ('out_in' is torch.nn.Linear)"
            )

    def rewrite_weight(self, layer: int) -> torch.Tensor:
        """The rewrite weight parameter of ``layer`` (d × d_ff for ``out_in``, d_ff × d for ``in_out``)."""
        weight = self.rewrite(layer).weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def key_dim(self, layer: int) -> int:
        """d_ff: the rewrite module's input size."""
        w = self.rewrite_weight(layer)
        return int(w.shape[1] if self.spec.weight_layout == "out_in" else w.shape[0])

    def hidden_dim(self, layer: int) -> int:
        """d: the rewrite module's output size (the residual stream width)."""
        w = self.rewrite_weight(layer)
        return int(w.shape[0] if self.spec.weight_layout == "out_in" else w.shape[1])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        """What an edit records about the architecture."""
        return {"model_type": self.model_type, "num_layers": self.num_layers, "spec": self.spec.to_dict()}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (any dtype, including bfloat16), with its dtype and shape."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class WeightSnapshot:
    """Exact copies of some layers' rewrite weights, taken when it is made, that :meth:`restore` puts
    back bit for bit.

    As a context manager it restores them when the block raises (any exception, Ctrl-C included) and
    keeps the changes otherwise::

        with WeightSnapshot(parts, layers) as snapshot:
            ...  # change the weights; on failure they are as before
        snapshot.restore()  # later: undo
    """

    def __init__(self, parts: ModelParts, layers: Iterable[int]) -> None:
        self.parts = parts
        self.originals = {layer: parts.rewrite_weight(layer).detach().clone() for layer in layers}

    def restore(self) -> None:
        """Copies every saved weight back. An interrupt during the copy finishes it before it propagates:
        a half-restored model could be neither undone nor kept."""
        try:
            self._copy_back()
        except KeyboardInterrupt:
            self._copy_back()
            raise

    def _copy_back(self) -> None:
        with torch.no_grad():
            for layer, weight in self.originals.items():
                self.parts.rewrite_weight(layer).copy_(weight)

    def __enter__(self) -> WeightSnapshot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.restore()


@contextmanager
def eval_mode(model: nn.Module, *, frozen: bool = False) -> Iterator[nn.Module]:
    """Runs the block with ``model`` in eval mode (and, if ``frozen``, with ``requires_grad`` off on every
    parameter), then restores its training mode and every parameter's flag as they were."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()] if frozen else []
    model.eval()
    if frozen:
        model.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in zip(model.parameters(), flags, strict=False):
            param.requires_grad_(flag)
        model.train(was_training)
