"""The architecture registry (``eamet.base.arch``) and ``ModelParts`` (``eamet.model.parts``): every
registered family resolves on a tiny random model to modules that really play the roles the registry
claims."""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
import torch
from torch import nn

import eamet
from eamet.base import arch as arch_module
from eamet.base.arch import ArchSpec, arch_for, known_architectures, register_arch
from eamet.base.errors import ParameterError, UnsupportedArchitectureError
from eamet.model.parts import ModelParts, tensor_sha256
from tiny import TINY_FAMILIES, tiny_model

# gemma2 passes the MLP output through post_feedforward_layernorm (a nonlinear RMSNorm) before the residual
# add, so its down_proj output is not the block's residual contribution: it must stay unregistered.
UNSUPPORTED = {"gemma2"}
REGISTERED = [f for f in TINY_FAMILIES if f not in UNSUPPORTED]
HIDDEN, FFN, N_LAYER = 32, 48, 3


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ArchSpec]]:
    """A private copy of the registry, so registrations in a test never leak into others."""
    copy = dict(arch_module._REGISTRY)
    monkeypatch.setattr(arch_module, "_REGISTRY", copy)
    yield copy


def model_of(family: str) -> Any:
    return tiny_model(family, n_layer=N_LAYER, hidden=HIDDEN, ffn=FFN)


def expected_ffn(family: str) -> int:
    return 4 * HIDDEN if family == "falcon" else FFN  # tiny falcon's MLP is always 4*hidden


# -- ArchSpec ------------------------------------------------------------------------------------------


def test_archspec_paths_and_round_trip() -> None:
    spec = ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", "in_out")
    assert spec.rewrite_path(7) == "transformer.h.7.mlp.c_proj"
    data = spec.to_dict()
    assert data == {
        "blocks": "transformer.h",
        "rewrite": "mlp.c_proj",
        "final_norm": "transformer.ln_f",
        "unembed": "lm_head",
        "weight_layout": "in_out",
    }
    assert ArchSpec(**json.loads(json.dumps(data))) == spec
    assert ArchSpec("a", "b", "c", "d").weight_layout == "out_in"  # the nn.Linear default
    with pytest.raises(FrozenInstanceError):
        spec.blocks = "x"  # type: ignore[misc]
    assert len({spec, ArchSpec(**data)}) == 1  # hashable, equal by value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_layout": "in"},
        {"weight_layout": "OUT_IN"},
        {"blocks": ""},
        {"rewrite": "model.layers.{}.mlp.down_proj"},  # a reference-style template, not a path
        {"final_norm": None},
        {"unembed": 3},
    ],
    ids=str,
)
def test_archspec_rejects_bad_fields(kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {
        "blocks": "model.layers",
        "rewrite": "mlp.down_proj",
        "final_norm": "model.norm",
        "unembed": "lm_head",
        **kwargs,
    }
    with pytest.raises(ParameterError):
        ArchSpec(**values)


# -- the registry --------------------------------------------------------------------------------------


def test_known_architectures_is_sorted_and_covers_the_tiny_families() -> None:
    names = known_architectures()
    assert names == sorted(names)
    assert set(REGISTERED) <= set(names)
    assert not UNSUPPORTED & set(names)
    names.append("zzz")  # a copy: the registry is untouched
    assert "zzz" not in known_architectures()
    assert eamet.known_architectures is known_architectures and eamet.register_arch is register_arch


def test_registry_matches_the_reference_module_templates() -> None:
    """algorithm.md §7: the rewrite/block/final-norm modules named by the reference hparams files."""
    cfg = types.SimpleNamespace
    llama = arch_for(cfg(model_type="llama"))
    assert llama.rewrite_path(3) == "model.layers.3.mlp.down_proj"
    assert (llama.final_norm, llama.unembed, llama.weight_layout) == ("model.norm", "lm_head", "out_in")
    for model_type in ("qwen2", "gemma", "mistral"):  # Qwen2.5, Gemma, DeepSeek/Mistral: LLaMA's layout
        assert arch_for(cfg(model_type=model_type)) == llama
    falcon = arch_for(cfg(model_type="falcon"))
    assert falcon.rewrite_path(3) == "transformer.h.3.mlp.dense_4h_to_h"
    assert falcon.final_norm == "transformer.ln_f"
    phi = arch_for(cfg(model_type="phi"))
    assert phi.rewrite_path(3) == "model.layers.3.mlp.fc2"
    assert phi.final_norm == "model.final_layernorm"
    gpt2 = arch_for(cfg(model_type="gpt2"))
    assert gpt2.weight_layout == "in_out"  # transformers' Conv1D stores [in, out]
    assert all(
        arch_for(cfg(model_type=name)).weight_layout == "out_in"
        for name in known_architectures()
        if name != "gpt2"
    )


def test_arch_for_accepts_a_model_or_its_config() -> None:
    model = model_of("llama")
    assert arch_for(model) is arch_for(model.config)


@pytest.mark.parametrize("model_type", ["not_a_model", "LLAMA", "", None, 3])
def test_arch_for_rejects_unknown_types(model_type: Any) -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        arch_for(types.SimpleNamespace(model_type=model_type))
    message = str(info.value)
    assert repr(model_type) in message and "register_arch" in message and "llama" in message


def test_arch_for_without_model_type() -> None:
    with pytest.raises(UnsupportedArchitectureError):
        arch_for(object())


def test_gemma2_is_refused_by_model_parts() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="gemma2"):
        ModelParts(model_of("gemma2"))


def test_register_arch(registry: dict[str, ArchSpec]) -> None:
    spec = ArchSpec("model.layers", "mlp.down_proj", "model.norm", "lm_head")
    register_arch("my_family", spec)
    assert "my_family" in known_architectures()
    assert arch_for(types.SimpleNamespace(model_type="my_family")) is spec
    other = ArchSpec("model.layers", "mlp.up_proj", "model.norm", "lm_head")
    with pytest.raises(ParameterError, match="already registered"):
        register_arch("my_family", other)
    assert arch_for(types.SimpleNamespace(model_type="my_family")) is spec  # unchanged by the refusal
    register_arch("my_family", other, replace=True)
    assert arch_for(types.SimpleNamespace(model_type="my_family")) is other
    with pytest.raises(ParameterError, match="already registered"):
        register_arch("llama", spec)  # built-in entries are protected too


def test_register_arch_rejects_non_specs(registry: dict[str, ArchSpec]) -> None:
    with pytest.raises(ParameterError) as info:
        register_arch("x", {"blocks": "model.layers"})  # type: ignore[arg-type]
    assert info.value.argument == "spec"
    assert "x" not in known_architectures()


def test_registered_family_works_with_model_parts(registry: dict[str, ArchSpec]) -> None:
    """A model whose model_type is unknown becomes editable once registered."""
    model = model_of("llama")
    model.config.model_type = "llama_clone"
    with pytest.raises(UnsupportedArchitectureError):
        ModelParts(model)
    register_arch("llama_clone", ArchSpec("model.layers", "mlp.down_proj", "model.norm", "lm_head"))
    parts = ModelParts(model)
    assert parts.model_type == "llama_clone" and parts.key_dim(0) == FFN


# -- ModelParts on every registered family -------------------------------------------------------------


@pytest.mark.parametrize("family", REGISTERED)
def test_model_parts_resolves_every_family(family: str) -> None:
    """The rewrite module takes the d_ff key and writes d, its block owns it, the final norm's output is
    what the unembedding turns into the model's logits."""
    model = model_of(family)
    parts = ModelParts(model)
    assert parts.spec is arch_for(model)
    assert parts.num_layers == N_LAYER and parts.model_type == family
    d_ff = expected_ffn(family)
    for layer in range(N_LAYER):
        module = parts.rewrite(layer)
        assert module is model.get_submodule(parts.spec.rewrite_path(layer))
        assert any(m is module for m in parts.block(layer).modules())
        weight = parts.rewrite_weight(layer)
        assert isinstance(weight, nn.Parameter) and weight is module.weight
        assert parts.key_dim(layer) == d_ff and parts.hidden_dim(layer) == HIDDEN
        expected_shape = (d_ff, HIDDEN) if parts.spec.weight_layout == "in_out" else (HIDDEN, d_ff)
        assert tuple(weight.shape) == expected_shape
    assert parts.unembed is model.get_output_embeddings()
    assert parts.device == torch.device("cpu")
    assert parts.describe() == {
        "model_type": family,
        "num_layers": N_LAYER,
        "spec": parts.spec.to_dict(),
    }

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        parts.rewrite(N_LAYER - 1).register_forward_hook(
            lambda _m, i, o: seen.update(key=i[0], out=o if isinstance(o, torch.Tensor) else o[0])
        ),
        parts.final_norm.register_forward_hook(lambda _m, _i, o: seen.update(normed=o)),
    ]
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            from_norm = parts.unembed(seen["normed"])
    finally:
        for hook in hooks:
            hook.remove()
    # (opt flattens batch and sequence inside its blocks, so only the sizes are family-independent)
    assert seen["key"].shape[-1] == d_ff and seen["key"].numel() == 6 * d_ff
    assert seen["out"].shape[-1] == HIDDEN and seen["out"].numel() == 6 * HIDDEN
    torch.testing.assert_close(from_norm, logits)


@pytest.mark.parametrize("family", REGISTERED)
def test_engine_keys_are_the_rewrite_input_at_the_fact_token(family: str) -> None:
    """The registry's claim checked through the engine: ``keys.collect`` of a bare prompt returns exactly
    what the rewrite module of the key layer receives at the subject's last token, for every family."""
    from eamet.base.facts import Fact
    from eamet.edit.keys import PromptSet, collect
    from eamet.model.tokens import TokenAdapter
    from tiny import bpe_tokenizer

    model = tiny_model(family, n_layer=N_LAYER, hidden=HIDDEN, ffn=FFN, vocab_size=256)
    parts = ModelParts(model)
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False))
    facts = [
        Fact("capital city : {}", "Danielle Darrieux", "Paris"),
        Fact("The mother tongue of {} is", "Marie Curie", "French"),
    ]
    prompts = PromptSet.build(tokens, facts, ["{}"], "subject_last")
    keys, hidden = collect(model, parts, tokens, prompts, key_layer=1, hidden_layer=1)
    assert keys is not None and hidden is not None
    assert keys.shape == (2, expected_ffn(family)) and hidden.shape == (2, HIDDEN)
    store: dict[str, torch.Tensor] = {}
    for i, fact in enumerate(facts):
        enc = tokens.prompt(fact.prompt, fact.subject)
        hook = parts.rewrite(1).register_forward_pre_hook(lambda _m, a: store.update(key=a[0]))
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([enc.ids]))
        finally:
            hook.remove()
        want = store["key"].reshape(len(enc.ids), -1)[enc.fact_index]
        torch.testing.assert_close(keys[i], want, rtol=1e-4, atol=1e-5)


def test_model_parts_accepts_an_explicit_spec() -> None:
    model = model_of("llama")
    spec = ArchSpec("model.layers", "mlp.gate_proj", "model.norm", "lm_head")  # d_ff x d: keys of size d
    parts = ModelParts(model, spec)
    assert parts.spec is spec
    assert (parts.key_dim(0), parts.hidden_dim(0)) == (HIDDEN, FFN)


@pytest.mark.parametrize(
    ("family", "spec", "match"),
    [
        (
            "gpt2",
            ArchSpec("transformer.blocks", "mlp.c_proj", "transformer.ln_f", "lm_head", "in_out"),
            "no module",
        ),
        (
            "gpt2",
            ArchSpec("transformer.ln_f", "mlp.c_proj", "transformer.ln_f", "lm_head", "in_out"),
            "not a list",
        ),
        ("gpt2", ArchSpec("transformer.h", "mlp.nope", "transformer.ln_f", "lm_head", "in_out"), "no module"),
        ("gpt2", ArchSpec("transformer.h", "mlp", "transformer.ln_f", "lm_head", "in_out"), "2-D weight"),
        ("gpt2", ArchSpec("transformer.h", "ln_1", "transformer.ln_f", "lm_head", "in_out"), "2-D weight"),
        ("gpt2", ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", "out_in"), "Conv1D"),
        ("llama", ArchSpec("model.layers", "mlp.down_proj", "model.norm", "lm_head", "in_out"), "Linear"),
    ],
    ids=[
        "blocks-missing",
        "blocks-not-list",
        "rewrite-missing",
        "no-weight",
        "1d-weight",
        "conv1d",
        "linear",
    ],
)
def test_model_parts_rejects_specs_that_do_not_fit(family: str, spec: ArchSpec, match: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=match):
        ModelParts(model_of(family), spec)


@pytest.mark.parametrize("field", ["final_norm", "unembed"])
def test_model_parts_checks_every_path_at_construction(field: str) -> None:
    values = {
        "blocks": "model.layers",
        "rewrite": "mlp.down_proj",
        "final_norm": "model.norm",
        "unembed": "lm_head",
    }
    values[field] = "model.typo"
    with pytest.raises(UnsupportedArchitectureError):
        ModelParts(model_of("llama"), ArchSpec(**values))


def test_missing_final_norm_is_named() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.typo"):
        ModelParts(model_of("llama"), ArchSpec("model.layers", "mlp.down_proj", "model.typo", "lm_head"))


@pytest.mark.parametrize("layer", [-1, N_LAYER, 100])
def test_layer_out_of_range(layer: int) -> None:
    parts = ModelParts(model_of("gpt2"))
    for call in (parts.block, parts.rewrite, parts.rewrite_weight, parts.key_dim, parts.hidden_dim):
        with pytest.raises(UnsupportedArchitectureError, match="out of range"):
            call(layer)


def test_model_parts_does_not_touch_the_weights() -> None:
    model = model_of("gptj")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parts = ModelParts(model)
    parts.describe()
    _ = parts.rewrite_weight(0), parts.final_norm, parts.unembed
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- tensor_sha256 -------------------------------------------------------------------------------------


def test_tensor_sha256_format() -> None:
    """SHA-256 over the dtype and shape text, then the raw bytes (a format saved edits depend on)."""
    t = torch.tensor([[1.0, -2.5], [3.0, 0.25]], dtype=torch.float32)
    expected = hashlib.sha256(b"torch.float32(2, 2)" + t.numpy().tobytes()).hexdigest()
    assert tensor_sha256(t) == expected


def test_tensor_sha256_sensitivity() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 6, generator=gen)
    h = tensor_sha256(t)
    assert h == tensor_sha256(t.clone()) and len(h) == 64
    assert h == tensor_sha256(nn.Parameter(t.clone()))  # requires_grad does not matter
    changed = t.clone()
    changed[3, 5] = torch.nextafter(changed[3, 5], torch.tensor(10.0))  # one ulp in one element
    assert tensor_sha256(changed) != h
    assert tensor_sha256(t.reshape(6, 4)) != h  # same bytes, other shape
    assert tensor_sha256(t.view(torch.int32)) != h  # same bytes, other dtype
    assert tensor_sha256(t.double()) != h


def test_tensor_sha256_layouts_and_dtypes() -> None:
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(5, 3, generator=gen)
    assert not t.T.is_contiguous()
    assert tensor_sha256(t.T) == tensor_sha256(t.T.contiguous())
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool):
        x = t.to(dtype)
        assert tensor_sha256(x) == tensor_sha256(x.clone())
    bf = t.to(torch.bfloat16)
    bumped = bf.clone()
    bumped[0, 0] = -bumped[0, 0]
    assert tensor_sha256(bf) != tensor_sha256(bumped)
    assert tensor_sha256(torch.zeros(0, 3)) != tensor_sha256(torch.zeros(3, 0))


def test_by_position_reads_flattened_activations_and_names_bad_shapes() -> None:
    from eamet.model.hooks import by_position

    x = torch.arange(24.0).reshape(6, 4)
    torch.testing.assert_close(by_position(x, 2, 3), x.reshape(2, 3, 4))
    assert torch.equal(by_position(x.reshape(2, 3, 4), 2, 3), x.reshape(2, 3, 4))  # already (B, T, d)
    with pytest.raises(UnsupportedArchitectureError, match=r"\(6, 4\)"):
        by_position(x, 2, 4)


def test_registered_layout_only_adopts_an_entry_with_the_same_paths() -> None:
    from eamet.base.arch import registered_layout

    gpt2 = model_of("gpt2")
    from_hparams = ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head")
    assert registered_layout(from_hparams, gpt2).weight_layout == "in_out"
    other = ArchSpec("transformer.h", "mlp.c_fc", "transformer.ln_f", "lm_head")
    assert registered_layout(other, gpt2) == other
    assert registered_layout(from_hparams, model_of("gpt_neo")).weight_layout == "out_in"


# -- model_dims and spec_from_paths -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "falcon", "opt", "gpt_neox", "phi"])
def test_model_dims_reads_every_familys_names(family: str) -> None:
    from eamet.base.arch import model_dims

    model = tiny_model(family)
    dims = model_dims(model)
    parts = ModelParts(model)
    assert dims.num_layers == parts.num_layers
    assert (dims.hidden, dims.ffn) == (parts.hidden_dim(0), parts.key_dim(0))
    assert dims.max_positions is not None and dims.max_positions > 0
    assert model_dims(model.config) == dims  # a config works as well as its model


def test_model_dims_defaults_and_errors() -> None:
    from types import SimpleNamespace

    from eamet.base.arch import model_dims

    gpt2_like = SimpleNamespace(n_layer=3, n_embd=16, n_inner=None, n_positions=64)
    assert model_dims(gpt2_like) == model_dims(
        SimpleNamespace(n_layer=3, n_embd=16, n_inner=64, n_positions=64)
    )
    assert model_dims(SimpleNamespace(num_layers=2, d_model=8, ffn_dim=32)).max_positions is None
    with pytest.raises(ParameterError, match="num_hidden_layers"):
        model_dims(SimpleNamespace(hidden_size=8))


def test_spec_from_paths_takes_what_a_hparams_file_leaves_out_from_the_registry() -> None:
    from eamet.base.arch import spec_from_paths

    llama = spec_from_paths("model.layers", "mlp.down_proj")
    assert (llama.final_norm, llama.unembed, llama.weight_layout) == ("model.norm", "lm_head", "out_in")
    # GPT-2 and GPT-Neo share their paths but not their layout: the layout stays for the model to settle.
    gpt = spec_from_paths("transformer.h", "mlp.c_proj")
    assert gpt.final_norm == "transformer.ln_f" and gpt.weight_layout == "out_in"
    custom = spec_from_paths("net.blocks", "ff.out", "net.norm", "head")
    assert custom == ArchSpec("net.blocks", "ff.out", "net.norm", "head")
    with pytest.raises(ParameterError, match="ln_f_module"):
        spec_from_paths("net.blocks", "ff.out")


# -- WeightSnapshot and eval_mode ---------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("x"), KeyboardInterrupt()], ids=lambda e: type(e).__name__)
def test_weight_snapshot_restores_on_error_and_keeps_changes_otherwise(exc: BaseException) -> None:
    from eamet.model.parts import WeightSnapshot

    model = tiny_model("llama")
    parts = ModelParts(model)
    original = parts.rewrite_weight(1).detach().clone()
    with pytest.raises(type(exc)), WeightSnapshot(parts, [1]), torch.no_grad():
        parts.rewrite_weight(1).add_(1.0)
        raise exc
    assert torch.equal(parts.rewrite_weight(1), original)
    with WeightSnapshot(parts, [1]) as snapshot, torch.no_grad():
        parts.rewrite_weight(1).add_(1.0)
    assert not torch.equal(parts.rewrite_weight(1), original)
    snapshot.restore()
    assert torch.equal(parts.rewrite_weight(1), original)


def test_eval_mode_restores_mode_and_flags() -> None:
    from eamet.model.parts import eval_mode

    model = tiny_model("gpt2")
    model.train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    flags = [p.requires_grad for p in params]
    with pytest.raises(RuntimeError), eval_mode(model, frozen=True):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        raise RuntimeError
    assert model.training and [p.requires_grad for p in params] == flags
    with eval_mode(model):
        assert not model.training and [p.requires_grad for p in params] == flags
    assert model.training
