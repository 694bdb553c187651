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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from eamet.base.choices import WeightLayout
from eamet.base.errors import ParameterError, UnsupportedArchitectureError

__all__ = [
    "ArchSpec",
    "ModelDims",
    "arch_for",
    "known_architectures",
    "model_dims",
    "register_arch",
    "registered_layout",
    "spec_from_paths",
]


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


def spec_from_paths(
    blocks: str, rewrite: str, final_norm: str | None = None, unembed: str | None = None
) -> ArchSpec:
    """An ``ArchSpec`` from module paths, as reference hparams files give them (``layer_module_tmp`` minus
    ``.{}``, the rewrite path within a block, ``ln_f_module``, ``lm_head_module``).

    A final norm or unembedding the caller leaves out comes from the registered families with the same
    ``blocks`` and ``rewrite`` paths (when they agree on it). The weight layout is left at ``"out_in"``:
    those files never state it, and families with the same paths can differ (GPT-2's Conv1D and GPT-Neo's
    Linear); :func:`registered_layout` settles it against the model. Raises ``ParameterError`` if a path is
    missing and the registry cannot supply it.
    """
    known = [spec for spec in _REGISTRY.values() if (spec.blocks, spec.rewrite) == (blocks, rewrite)]
    norms = {spec.final_norm for spec in known}
    heads = {spec.unembed for spec in known}
    if final_norm is None and len(norms) == 1:
        final_norm = norms.pop()
    if unembed is None and len(heads) == 1:
        unembed = heads.pop()
    if final_norm is None or unembed is None:
        raise ParameterError(
            f"no registered architecture tells the final norm and unembedding of blocks {blocks!r} with "
            f"rewrite module {rewrite!r}; give their paths (ln_f_module, lm_head_module) too"
        )
    return ArchSpec(blocks, rewrite, final_norm, unembed)


# -- sizes from a Hugging Face config ----------------------------------------------------------------------

# Each family names its sizes its own way; the first name present wins.
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_FFN = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
_POSITIONS = ("max_position_embeddings", "n_positions")


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a causal LM that editing settings depend on, read from its config.

    Attributes:
        num_layers: transformer blocks; hidden: d, the residual stream width; ffn: d_ff, the MLP width (the
            key dimension); max_positions: the longest sequence, or ``None`` when the config does not say.
    """

    num_layers: int
    hidden: int
    ffn: int
    max_positions: int | None


def model_dims(model_or_config: Any) -> ModelDims:
    """:class:`ModelDims` of a model or its config, whatever names its family uses (torch-free).

    The MLP width defaults to 4 × hidden where the config leaves it unset (GPT-2's ``n_inner=None``).
    Raises ``ParameterError`` when the number of blocks or the hidden size cannot be found.
    """
    config = getattr(model_or_config, "config", model_or_config)
    hidden = _int_attr(config, _HIDDEN)
    ffn = _int_attr(config, _FFN, required=False)
    num_layers = _int_attr(config, _LAYERS)
    assert hidden is not None and num_layers is not None
    return ModelDims(
        num_layers=num_layers,
        hidden=hidden,
        ffn=ffn if ffn is not None else 4 * hidden,
        max_positions=_int_attr(config, _POSITIONS, required=False),
    )


def _int_attr(config: Any, names: Sequence[str], *, required: bool = True) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if required:
        raise ParameterError(f"the model config has none of {', '.join(names)}")
    return None
