"""THE architecture registry: where each model family keeps the modules an edit touches.

This module is data only. Every other module asks it for paths; none mentions a family by name. An entry
is keyed by ``config.model_type`` (never by a checkpoint's name) and names, as dotted attribute paths:

* ``blocks``: the list of transformer blocks, from the model root;
* ``rewrite``: the edited MLP output projection (its input is the *key*), relative to one block;
* ``final_norm`` and ``unembed``: from the model root, used when the loss is read at an earlier block;
* ``weight_layout``: how the rewrite weight is stored. ``"out_in"`` is ``torch.nn.Linear`` (d × d_ff);
  ``"in_out"`` is the GPT-2-style ``Conv1D`` (d_ff × d). It is declared here, never guessed from shapes
  (they agree whenever d = d_ff).

Add a family with :func:`register_arch`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from eamet.errors import ParameterError, UnsupportedArchitectureError

__all__ = ["ArchSpec", "arch_for", "known_architectures", "register_arch", "registered_layout"]

WeightLayout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family (see the module docstring)."""

    blocks: str
    rewrite: str
    final_norm: str
    unembed: str
    weight_layout: WeightLayout = "out_in"

    def __post_init__(self) -> None:
        if self.weight_layout not in ("out_in", "in_out"):
            raise ParameterError(f"weight_layout must be 'out_in' or 'in_out', got {self.weight_layout!r}")
        for name in ("blocks", "rewrite", "final_norm", "unembed"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or "{}" in value:
                raise ParameterError(f"ArchSpec.{name} must be a dotted module path, got {value!r}")

    def rewrite_path(self, layer: int) -> str:
        """Full dotted path of the rewrite module of block ``layer``."""
        return f"{self.blocks}.{layer}.{self.rewrite}"

    def to_dict(self) -> dict[str, str]:
        """JSON-ready copy (saved with edits)."""
        return asdict(self)


_DECODER = ArchSpec(
    blocks="model.layers", rewrite="mlp.down_proj", final_norm="model.norm", unembed="lm_head"
)

_REGISTRY: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", "in_out"),
    "gpt_neo": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head"),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head"),
    "falcon": ArchSpec("transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f", "lm_head"),
    "phi": ArchSpec("model.layers", "mlp.fc2", "model.final_layernorm", "lm_head"),
    "opt": ArchSpec("model.decoder.layers", "fc2", "model.decoder.final_layer_norm", "lm_head"),
    "starcoder2": ArchSpec("model.layers", "mlp.c_proj", "model.norm", "lm_head"),
    **{
        name: _DECODER for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "stablelm")
    },
}


def register_arch(model_type: str, spec: ArchSpec, *, replace: bool = False) -> None:
    """Registers ``spec`` for models whose ``config.model_type`` is ``model_type``.

    Raises ``ParameterError`` if the family is already registered, unless ``replace=True``.
    """
    if not isinstance(spec, ArchSpec):
        raise ParameterError(f"spec must be an ArchSpec, got {type(spec).__name__}", argument="spec")
    if model_type in _REGISTRY and not replace:
        raise ParameterError(f"architecture {model_type!r} is already registered; pass replace=True")
    _REGISTRY[model_type] = spec


def known_architectures() -> list[str]:
    """Sorted ``model_type`` names in the registry."""
    return sorted(_REGISTRY)


def arch_for(model_or_config: Any) -> ArchSpec:
    """The registry entry for a model (or its config), by ``config.model_type``.

    Raises ``UnsupportedArchitectureError`` naming the type and listing the known ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not in the architecture registry (known: "
            f"{', '.join(known_architectures())}); describe its modules with eamet.register_arch()"
        )
    return spec


def registered_layout(spec: ArchSpec, model_or_config: Any) -> ArchSpec:
    """``spec`` with the weight layout of the model's registry entry when both name the same modules.

    Reference hparams files give module paths but never the weight orientation, so a spec read from
    them says ``"out_in"`` by default; for a registered family (GPT-2's Conv1D) the registry knows better.
    Any other spec is returned unchanged.
    """
    config = getattr(model_or_config, "config", model_or_config)
    registered = _REGISTRY.get(getattr(config, "model_type", None) or "")
    if registered is None:
        return spec
    if replace(spec, weight_layout=registered.weight_layout) == registered:
        return registered
    return spec
