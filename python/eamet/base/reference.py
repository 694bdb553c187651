"""The reference implementation's vocabulary: its context-template seed words, its covariance corpus, and
the import of its ``hparams`` JSON files into eamet's settings (``EditConfig.from_json``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from eamet.base.arch import ArchSpec, spec_from_paths
from eamet.base.choices import Method
from eamet.base.errors import ParameterError

__all__ = ["REFERENCE_CORPUS", "TEMPLATE_SEEDS", "from_reference"]


# algorithm.md §2: the reference's 12 seed words ("Because" twice, kept for fidelity).
TEMPLATE_SEEDS: tuple[str, ...] = (
    "The",
    "Therefore",
    "Because",
    "I",
    "You",
    "However",
    "Also",
    "Nevertheless",
    "He",
    "It",
    "Can",
    "Because",
)


# The reference's covariance corpus (§6.3). Its loader script is gone from current `datasets`, so
# loading it normally fails offline *and* online; pass another corpus (see edit/corpus.py).
REFERENCE_CORPUS = "hf:wikipedia:20200501.en"


def from_reference(data: Mapping[str, Any]) -> tuple[Method, dict[str, Any]]:
    """The method and the ``EditConfig`` settings a reference ``hparams/{EAMET,MEMIT}/*.json`` dict stands for
    (algorithm.md §4.3c and §7): reference keys mapped onto eamet's names, keys the algorithm never reads
    ignored, unknown keys warned about."""
    decay_method = data.get("weight_decay_method")
    method: Method = "eamet" if decay_method == "fix_ks" or "cs_factor" in data else "memit"
    v: dict[str, Any] = {}
    direct = (
        "layers",
        "fact_token",
        "v_num_grad_steps",
        "v_lr",
        "v_loss_layer",
        "kl_factor",
        "cs_factor",
        "mse_factor",
        "tau",
        "delta_init",
        "mom2_n_samples",
        "mom2_dtype",
    )
    for key in direct:
        if key in data:
            v[key] = data[key]
    if "layers" in v:
        v["layers"] = tuple(v["layers"])
    weight = data.get("mom2_update_weight")
    if weight is not None:
        v["mom2_update_weight"] = tuple(weight) if isinstance(weight, Sequence) else (float(weight),)
    if decay_method == "fix_ks":
        v.update(
            clamp="key_norm",
            clamp_factor=data.get("clamp_ks_factor", 2.0),
            norm_penalty="fix_ks",
            norm_penalty_factor=data.get("norm_factor", 0.0),
        )
    elif decay_method == "norm":
        v.update(
            clamp="hidden_norm",
            clamp_factor=data.get("clamp_norm_factor", 0.75),
            norm_penalty="norm",
            norm_penalty_factor=data.get("v_weight_decay", 0.5),
        )
    else:
        v.update(
            clamp="hidden_norm",
            clamp_factor=data.get("clamp_norm_factor", 0.75),
            norm_penalty="squared_norm",
            norm_penalty_factor=data.get("v_weight_decay", 0.5),
        )
    if data.get("mom2_dataset") == "wikipedia":
        v["mom2_dataset"] = REFERENCE_CORPUS
    elif isinstance(data.get("mom2_dataset"), str):
        v["mom2_dataset"] = data["mom2_dataset"]
    layer_tmp, rewrite_tmp = data.get("layer_module_tmp"), data.get("rewrite_module_tmp")
    if isinstance(layer_tmp, str) and isinstance(rewrite_tmp, str):
        v["modules"] = _spec_from_templates(layer_tmp, rewrite_tmp, data)
    used = set(direct) | {
        "mom2_update_weight",
        "weight_decay_method",
        "clamp_ks_factor",
        "norm_factor",
        "clamp_norm_factor",
        "v_weight_decay",
        "mom2_dataset",
        "layer_module_tmp",
        "rewrite_module_tmp",
        "ln_f_module",
        "lm_head_module",
    }
    unknown = sorted(set(data) - used - _REFERENCE_UNUSED)
    if unknown:
        warnings.warn(f"ignoring unknown hparams keys: {', '.join(unknown)}", stacklevel=3)
    return method, v


def _spec_from_templates(layer_tmp: str, rewrite_tmp: str, data: Mapping[str, Any]) -> ArchSpec:
    # "model.layers.{}" + "model.layers.{}.mlp.down_proj" -> blocks "model.layers", rewrite "mlp.down_proj".
    if not layer_tmp.endswith("{}") or not rewrite_tmp.startswith(layer_tmp + "."):
        raise ParameterError(f"cannot read module templates {layer_tmp!r} / {rewrite_tmp!r}")
    blocks = layer_tmp.split("{}")[0].rstrip(".")
    rewrite = rewrite_tmp[len(layer_tmp) + 1 :]
    return spec_from_paths(blocks, rewrite, data.get("ln_f_module"), data.get("lm_head_module"))


_REFERENCE_UNUSED = {
    "layer_selection",
    "ks_bs",
    "mom2_adjustment",
    "mlp_module_tmp",
    "attn_module_tmp",
    "alg_name",
    "model_name",
    "context_template_length_params",
}
