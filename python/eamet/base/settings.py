"""``EditConfig``: every setting of an EAMET or MEMIT edit, and JSON in/out.

Glossary — one name per concept, in the code and the docs (setting names keep the reference's ``mom2_*``,
``v_*`` so that :meth:`EditConfig.from_json` reads its files):

================  =======================================================================================
name              meaning
================  =======================================================================================
fact              (subject, prompt, target): "The capital of {} is" + France → Lyon; N facts per edit
rewrite module    the MLP down-projection of an edited block (``ArchSpec.rewrite``), weight W (d × d_ff)
key k, K          the rewrite module's input at the fact token, (d_ff,); K is (N, d_ff) per edited block
h                 block l*'s output at the fact token (l* = the last edited block), (d,)
δ, ``delta``      the residual: how h must move for the model to say the target (the residual step finds
                  it); "residual" in prose, ``delta``/``deltas`` in code (``Residuals.deltas``)
z, ``targets``    z = h + δ, what the edit makes block l* output
shares r, R       each edited block's part of z − h (an equal share of what is still left), (N, d)
C                 the keys' second moment E[k kᵀ] over a corpus, (d_ff, d_ff): ``SecondMoment``,
                  ``SecondMomentCollector``, settings ``mom2_*`` (MEMIT's "covariance", kept in
                  ``Editor.covariance()``)
λ                 C's weight in the solve (``mom2_update_weight``, one per edited block)
U                 the solved keys U = K (λC + KᵀK)⁻¹, (N, d_ff)
Δ                 the weight change Rᵀ U (``LayerUpdate.weight_change()``), (d, d_ff)
leverage          k_iᵀ(λC + KᵀK)⁻¹k_i: the share of a lone fact's shares that Δ realises
================  =======================================================================================

MEMIT and EAMET share one procedure; they differ only in settings (algorithm.md §9.1), so ``method``
selects defaults and the optimiser never branches on it:

================  ==========================  ==========================
setting           EAMET                       MEMIT
================  ==========================  ==========================
delta_init        ``target_init``             ``zero``
clamp             ``key_norm`` × 2 (c_k)      ``hidden_norm`` × 0.75
norm_penalty      ``fix_ks`` × 0 (inactive)   ``squared_norm`` × 0.5
cs / mse factor   2 / 8                       0 / 0 (facts independent)
kl_anchor         ``initial_delta``           ``unedited`` (same: δ₀ = 0)
early_stop_from   iteration 1                 iteration 0
================  ==========================  ==========================
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from eamet.base.arch import ArchSpec, arch_for, model_dims
from eamet.base.choices import (
    BatchAlignment,
    BosPolicy,
    Clamp,
    DeltaInit,
    FactToken,
    KlAnchor,
    Method,
    NormPenalty,
    Solver,
    StatsDType,
    TeacherForcing,
    ZDtype,
    ZForward,
)
from eamet.base.errors import ParameterError
from eamet.base.presets import preset_overrides
from eamet.base.reference import REFERENCE_CORPUS, TEMPLATE_SEEDS, from_reference

__all__ = ["METHODS", "SOLVE_SETTINGS", "EditConfig", "Method"]

METHODS: tuple[Method, ...] = get_args(Method)

SOLVE_SETTINGS: tuple[str, ...] = (
    "layers",
    "mom2_update_weight",
    "solver",
    "mom2_dataset",
    "mom2_n_samples",
    "mom2_max_length",
    "mom2_dtype",
    "key_batch_size",
)
"""The settings of the solve Δ(λC + KKᵀ) = RKᵀ alone: changing them (``layers`` as long as the last one
stays) leaves every residual as it is, so :meth:`Editor.resolve` can redo an edit without the residual
step."""


@dataclass(frozen=True)
class EditConfig:
    """All settings of one edit. Defaults are the reference EAMET values for LLaMA-2-7B.

    Names follow the reference hparams where one exists (``v_lr``, ``mom2_update_weight`` ...);
    :meth:`from_json` reads the reference JSON files. Every deliberate difference from the reference has
    a switch here; docs/differences.md lists them.
    """

    method: Method = "eamet"
    layers: tuple[int, ...] = (3, 4)
    """Edited blocks, increasing; the residual is optimised at the last one (l*)."""
    fact_token: FactToken = "subject_last"

    # Residual optimisation (algorithm.md §4).
    v_num_grad_steps: int = 25
    """Iterations S; at most S - 1 Adam steps are taken."""
    v_lr: float = 0.5
    """Adam learning rate. The reference JSON says 0.04 but its launcher passes 0.5 (§4.4)."""
    v_loss_layer: int | None = None
    """Block whose output is scored; None = the last block, i.e. the model's own logits."""
    kl_factor: float = 0.0625
    cs_factor: float = 2.0
    """Weight of the alignment KL over earlier facts (0 makes facts independent)."""
    mse_factor: float = 8.0
    """Weight of the top-M weighted cosine MSE."""
    align_below_nll: float | None = None
    """eamet's own extension (not in the paper or the reference): the alignment terms count for a fact
    only at iterations where its NLL is below this value — the edit first, then its alignment among the
    residuals that make it. None (the reference): always. docs/benchmarks.md has why and what it does."""
    tau: float = 0.07
    top_m: int = 50
    eps: float = 1e-8
    delta_init: DeltaInit = "target_init"
    target_init_max_norm: float = 100.0
    """``target_init`` starts from (κ/‖h‖)·h only when ‖h‖ is below this (reference: 100)."""
    clamp: Clamp = "key_norm"
    clamp_factor: float = 2.0
    """Ball radius: clamp_factor·‖key‖ (``key_norm``, EAMET's c_k) or clamp_factor·‖h‖ (``hidden_norm``)."""
    norm_penalty: NormPenalty = "fix_ks"
    norm_penalty_factor: float = 0.0
    kl_anchor: KlAnchor = "initial_delta"
    """Essence-KL anchor: with δ₀ injected (the reference's EAMET behaviour) or the unedited model."""
    early_stop_loss: float = 0.01
    early_stop_from: int = 1
    essence_prompt: str = "{} is a"
    teacher_forcing: TeacherForcing = "ids"
    """``ids``: prompt ids ⊕ target ids (ours); ``string``: re-tokenised prompt text ⊕ decoded target
    prefix, scored at the last T positions (the reference; differs where tokens merge across the seam).
    """

    # Speed of the residual step (eamet's own; the reference runs facts one by one in float32).
    fact_batch: int = 1
    """Facts optimised together, B: one padded forward for B facts, one residual row each, each fact's
    loss, early stop and ball on its own (Adam is element-wise, so with MEMIT every residual is what it
    would be alone). 1 is the reference's serial order. With EAMET, a fact aligns against the saved
    residuals of earlier batches and, inside its batch, as ``batch_alignment`` says (docs/editing.md)."""
    batch_alignment: BatchAlignment = "current"
    """EAMET, fact_batch > 1: what fact i aligns against among the earlier facts of its own batch:
    ``none``; ``current`` (their current iterates, detached); ``second_pass`` (their results of a first
    pass over the batch; twice the work)."""
    z_dtype: ZDtype = "auto"
    """Compute dtype of the residual step's forward and backward (autocast); δ, the losses and Adam stay
    float32. ``auto``: bfloat16 on CUDA devices that support it and on CPUs with AMX tiles, else float32
    (docs/benchmarks.md has the measurements behind the rule)."""
    z_forward: ZForward = "fast"
    """``fast``: run the blocks up to the edited one once per batch and start every iteration from their
    output, and compute logits only where a target or the essence prompt is scored (exact: checked against
    ``full`` on the first batch of every edit, falling back to it with a warning if they differ);
    ``full``: the whole model and every position's logits at every iteration, as the reference."""
    z_chunk_tokens: int | None = None
    """At most this many padded tokens per forward in the residual step (bounds its memory); a larger
    batch runs as several forwards whose gradients add up, which changes nothing but the peak. None: one
    forward per iteration."""

    # Context templates (§2).
    template_seeds: tuple[str, ...] = TEMPLATE_SEEDS
    template_length: int = 10
    template_temperature: float = 0.5
    template_top_k: int = 100
    template_top_p: float = 0.9
    seed: int | None = 0
    """Seed of template sampling; None = unseeded (the reference's behaviour; not reproducible)."""

    # Tokenisation and keys (§1, §3).
    bos: BosPolicy = "native"
    """Prepend BOS as the tokenizer does by itself (``native``), always, or never."""
    key_batch_size: int = 128

    # The update (§6).
    mom2_update_weight: tuple[float, ...] = (4000.0, 4000.0)
    """λ per edited layer, scaling C = E[k kᵀ] in Δ(λC + KKᵀ) = RKᵀ; one number (or a 1-tuple) is used for
    every layer."""
    solver: Solver = "cholesky"
    """``cholesky`` (ours) or ``inverse`` (the reference's explicit float64 inverse)."""

    # Covariance statistics (§6.3).
    mom2_dataset: str = REFERENCE_CORPUS
    mom2_n_samples: int = 100_000
    mom2_dtype: StatsDType = "float32"
    mom2_max_length: int = 1024
    """Tokens per document (truncation), independent of the model's max_position_embeddings."""

    modules: ArchSpec | None = field(default=None, compare=True)
    """Module paths overriding the registry (set by :meth:`from_json` from ``rewrite_module_tmp`` etc.)."""

    def __post_init__(self) -> None:
        _check_choice(self, "method", Method)
        _check_choice(self, "fact_token", FactToken)
        _check_choice(self, "delta_init", DeltaInit)
        _check_choice(self, "clamp", Clamp)
        _check_choice(self, "norm_penalty", NormPenalty)
        _check_choice(self, "kl_anchor", KlAnchor)
        _check_choice(self, "bos", BosPolicy)
        _check_choice(self, "solver", Solver)
        _check_choice(self, "mom2_dtype", StatsDType)
        _check_choice(self, "teacher_forcing", TeacherForcing)
        _check_choice(self, "batch_alignment", BatchAlignment)
        _check_choice(self, "z_dtype", ZDtype)
        _check_choice(self, "z_forward", ZForward)
        layers = tuple(self.layers)
        if not layers or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in layers):
            raise ParameterError(f"layers must be non-negative ints, got {self.layers!r}", argument="layers")
        if list(layers) != sorted(set(layers)):
            raise ParameterError(f"layers must be increasing and distinct, got {layers}", argument="layers")
        object.__setattr__(self, "layers", layers)
        weights = _numbers(self.mom2_update_weight, "mom2_update_weight")
        if len(weights) == 1 and len(layers) > 1:
            weights = weights * len(layers)
        if len(weights) != len(layers) or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ParameterError(
                f"mom2_update_weight needs one finite λ >= 0 per layer ({len(layers)}), got {weights}",
                argument="mom2_update_weight",
            )
        object.__setattr__(self, "mom2_update_weight", weights)
        seeds = self.template_seeds
        if isinstance(seeds, str) or not all(isinstance(w, str) and w.strip() for w in seeds):
            raise ParameterError(
                f"template_seeds must be a sequence of non-empty words, got {seeds!r}",
                argument="template_seeds",
            )
        object.__setattr__(self, "template_seeds", tuple(seeds))
        for name in (
            "v_num_grad_steps",
            "top_m",
            "key_batch_size",
            "mom2_n_samples",
            "mom2_max_length",
            "fact_batch",
        ):
            _check_int(self, name, minimum=1)
        if self.z_chunk_tokens is not None:
            _check_int(self, "z_chunk_tokens", minimum=1)
        if self.align_below_nll is not None:
            _check_float(self, "align_below_nll", positive=True)
        _check_int(self, "template_length", minimum=0)
        _check_int(self, "early_stop_from", minimum=0)
        for name in ("v_lr", "tau", "eps", "template_temperature", "target_init_max_norm"):
            _check_float(self, name, positive=True)
        for name in (
            "kl_factor",
            "cs_factor",
            "mse_factor",
            "clamp_factor",
            "norm_penalty_factor",
            "early_stop_loss",
        ):
            _check_float(self, name, positive=False)
        if not 0 < self.template_top_p <= 1:
            raise ParameterError(f"template_top_p must be in (0, 1], got {self.template_top_p}")
        _check_int(self, "template_top_k", minimum=0)
        if self.essence_prompt.count("{}") != 1:
            raise ParameterError(f"essence_prompt needs exactly one '{{}}', got {self.essence_prompt!r}")
        if self.v_loss_layer is not None and self.v_loss_layer < layers[-1]:
            raise ParameterError(
                f"v_loss_layer {self.v_loss_layer} is before the last edited layer {layers[-1]}",
                argument="v_loss_layer",
            )

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def for_method(cls, method: Method = "eamet", **overrides: Any) -> EditConfig:
        """The reference defaults of ``method`` (LLaMA-2-7B values), with ``overrides`` applied."""
        _check_method(method)
        return cls(**{**_METHOD_DEFAULTS[method], **overrides})

    @classmethod
    def preset(cls, name: str, method: Method = "eamet") -> EditConfig:
        """The settings for one model, e.g. ``preset("llama2-7b")``: the reference's rows of
        algorithm.md §7, and eamet's own rows for models the reference never ran (``Preset.origin``;
        ``smollm2-135m``, measured in docs/benchmarks.md).

        Names (case-insensitive): see :data:`PRESETS`. ``phi-1.5`` exists for MEMIT only, as in the
        reference. Raises ``ParameterError`` for an unknown name.
        """
        _check_method(method)
        return cls.for_method(method, **preset_overrides(name, method))

    @classmethod
    def for_model(cls, model: Any, method: Method = "eamet", **overrides: Any) -> EditConfig:
        """Sensible settings for any registered model, tiny or unknown.

        Edits two consecutive blocks ending near 1/8 of the depth (blocks 3-4 of 32, as the reference),
        never the last block, a single block for 1-3-block models. λ is the method's LLaMA-2-7B value
        scaled by d_ff / 11008: C is a mean second moment, so λ is an effective token count and smaller
        keys spaces need fewer. Override anything with keyword arguments.
        """
        _check_method(method)
        arch_for(model)  # raises UnsupportedArchitectureError early
        dims = model_dims(model)
        n_layers = dims.num_layers
        last = min(max(1, round(n_layers / 8)), max(0, n_layers - 2))
        layers = (last,) if last == 0 or n_layers < 4 else (last - 1, last)
        base = cls.for_method(method).mom2_update_weight[0]
        lam = round(base * dims.ffn / 11008, 1)
        # One λ for every edited layer (also when ``layers`` is overridden alone): __post_init__ broadcasts.
        values: dict[str, Any] = {"layers": layers, "mom2_update_weight": (lam,)}
        if dims.max_positions is not None:
            values["mom2_max_length"] = min(1024, dims.max_positions)
        return cls.for_method(method, **{**values, **overrides})

    def on_layers(self, layers: Sequence[int], **changes: Any) -> EditConfig:
        """A copy editing ``layers`` (and with ``changes``): each block keeps its λ, a block not edited before
        takes the last block's. The one rule for a new set of blocks without new λs (the CLI's
        ``--layers``, :meth:`Editor.resolve`'s ``layers=``)."""
        lam = dict(zip(self.layers, self.mom2_update_weight, strict=True))
        weights = tuple(lam.get(layer, self.mom2_update_weight[-1]) for layer in layers)
        return self.replace(**{"layers": tuple(layers), "mom2_update_weight": weights, **changes})

    def replace(self, **changes: Any) -> EditConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- JSON ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (our format); :meth:`from_dict` restores it exactly."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The settings as JSON text, also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditConfig:
        """Inverse of :meth:`to_dict`. Raises ``ParameterError`` for an unknown key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ParameterError(f"unknown EditConfig keys: {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("modules"), Mapping):
            values["modules"] = ArchSpec(**values["modules"])
        for key in ("layers", "mom2_update_weight", "template_seeds"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> EditConfig:
        """Reads our JSON (:meth:`to_json`) or a reference ``hparams/{EAMET,MEMIT}/*.json`` file.

        ``source`` is a path, JSON text or a parsed dict. Reference files are recognised by their keys
        (``v_num_grad_steps`` ...); EAMET vs MEMIT by ``weight_decay_method``/``cs_factor``. Reference keys
        the algorithm never reads (``ks_bs``, ``layer_selection`` ...) are ignored; unknown keys warn.
        """
        data: Any
        if isinstance(source, Mapping):
            data = source
        else:
            text = str(source)
            is_text = isinstance(source, str) and text.lstrip().startswith("{")
            data = json.loads(text if is_text else Path(source).read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise ParameterError("a config JSON must hold an object")
        if "method" in data or not ({"v_num_grad_steps", "rewrite_module_tmp"} & set(data)):
            return cls.from_dict(data)
        method, values = from_reference(data)
        return cls.for_method(method, **values)


_METHOD_DEFAULTS: dict[Method, dict[str, Any]] = {
    "eamet": {"method": "eamet"},
    "memit": {
        "method": "memit",
        "delta_init": "zero",
        "clamp": "hidden_norm",
        "clamp_factor": 0.75,
        "norm_penalty": "squared_norm",
        "norm_penalty_factor": 0.5,
        "cs_factor": 0.0,
        "mse_factor": 0.0,
        "kl_anchor": "unedited",
        "early_stop_from": 0,
        "mom2_update_weight": (15000.0, 15000.0),
    },
}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ParameterError(
            f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}", argument="method"
        )


def _numbers(given: Any, name: str) -> tuple[float, ...]:
    """``given`` — one number or a sequence of numbers — as a tuple of floats; ParameterError otherwise."""
    if isinstance(given, numbers.Real) and not isinstance(given, bool):
        return (float(given),)
    is_sequence = not isinstance(given, str | bytes) and hasattr(given, "__iter__")
    items = list(given) if is_sequence else []
    if not is_sequence or any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in items):
        raise ParameterError(f"{name} must be a number or one number per layer, got {given!r}", argument=name)
    return tuple(float(x) for x in items)


def _check_choice(config: EditConfig, name: str, kind: Any) -> None:
    allowed = get_args(kind)
    if getattr(config, name) not in allowed:
        raise ParameterError(
            f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(config, name)!r}",
            argument=name,
        )


def _check_int(config: EditConfig, name: str, *, minimum: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ParameterError(f"{name} must be an int >= {minimum}, got {value!r}", argument=name)


def _check_float(config: EditConfig, name: str, *, positive: bool) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ParameterError(f"{name} must be a finite number {bound}, got {value!r}", argument=name)
