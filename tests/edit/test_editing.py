"""End-to-end tests of the editing engine (Editor / EditResult) on tiny random models.

Settings that make 16 edits decode reliably on the tiny GPT-2 and LLaMA (hidden 64, d_ff 256, 4 layers,
vocab 256, byte-level BPE; edited layers (0, 1); C over 400 corpus lines; 3 template seeds of length 4):

* MEMIT: clamp_factor 4 (×‖h‖), norm_penalty "none", 10 iterations -> 16/16 on both (model seeds 0-2).
* EAMET: 25 iterations; clamp_factor 2 (the default, ×‖key‖) on GPT-2 -> 16/16 (seeds 0-2);
  clamp_factor 4 on LLaMA -> 16/16 (seeds 0-2). The key norms differ ~5x between the two tiny models
  (GPT-2 ~1.0, LLaMA ~0.2), so one factor does not fit both: 2 on LLaMA gives 13-16/16, 4 on GPT-2 13-15/16.

A fact whose subject ends in the same token as another's ("...tner", "...ler", "...per" all end in "er")
fails much more often; the 16 subjects here end in distinct tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import eamet
import eamet.edit.editor as editor_module
import eamet.edit.results as results_module
from eamet import EditConfig, Fact
from eamet.base.errors import (
    CacheError,
    EditMismatchError,
    FactError,
    ParameterError,
    UnsupportedArchitectureError,
)
from eamet.edit.editor import Editor, EditResult
from eamet.edit.optimizer import ResidualOptimizer
from editing_helpers import (
    CORPUS,
    VOCAB,
    bit_equal,
    changed,
    check_distinct_last_tokens,
    facts16,
    flags,
    make_editor,
    odd_flags,
    report_arrays_equal,
    rewrite_names,
    same_weights,
    small_config,
    small_facts,
    small_model,
    snapshot,
    successes,
)
from tiny import TINY_FAMILIES, bpe_tokenizer, sentencepiece_tokenizer, tiny_model


def big_model(family: str, seed: int = 0) -> nn.Module:
    return tiny_model(family, seed=seed, vocab_size=VOCAB, n_layer=4, hidden=64, ffn=256)


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer(add_bos=False, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One statistics cache for the module (its keys include the model's weights and the settings)."""
    return tmp_path_factory.mktemp("eamet-stats")


# ---------------------------------------------------------------------------------------------------
# 16 facts on the tiny GPT-2 and LLaMA, with each method (shared by the success and report tests)

BIG_COMMON: dict[str, Any] = {
    "mom2_n_samples": 400,
    "template_length": 4,
    "template_seeds": ("The", "I", "It"),
}
BIG_SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("gpt2", "memit"): {"clamp_factor": 4.0, "norm_penalty": "none", "v_num_grad_steps": 10},
    ("llama", "memit"): {"clamp_factor": 4.0, "norm_penalty": "none", "v_num_grad_steps": 10},
    ("gpt2", "eamet"): {"v_num_grad_steps": 25},  # clamp_factor 2 (default)
    ("llama", "eamet"): {"v_num_grad_steps": 25, "clamp_factor": 4.0},
}
BIG_CASES = sorted(BIG_SETTINGS)


@dataclass
class BigEdit:
    model: nn.Module
    config: EditConfig
    result: EditResult
    before: dict[str, torch.Tensor]
    flags_before: tuple[list[bool], list[bool]]
    flags_after: tuple[list[bool], list[bool]]


@pytest.fixture(scope="module")
def big_edit(tok: Any, stats_dir: Path) -> Callable[[str, str], BigEdit]:
    """Lazily edits facts16() into a fresh big tiny model per (family, method). Tests must not mutate."""
    cache: dict[tuple[str, str], BigEdit] = {}

    def get(family: str, method: str) -> BigEdit:
        key = (family, method)
        if key not in cache:
            model = big_model(family)
            config = EditConfig.for_model(model, method, **BIG_COMMON, **BIG_SETTINGS[key])
            before, flags_before = snapshot(model), flags(model)
            facts = facts16()
            check_distinct_last_tokens(tok, facts)
            result = make_editor(model, tok, config, stats_dir).edit(facts, progress=False)
            cache[key] = BigEdit(model, config, result, before, flags_before, flags(model))
        return cache[key]

    return get


@pytest.mark.parametrize(("family", "method"), BIG_CASES)
def test_sixteen_facts_decode_and_only_rewrite_weights_change(
    big_edit: Callable[[str, str], BigEdit], tok: Any, family: str, method: str
) -> None:
    run = big_edit(family, method)
    facts = facts16()
    assert successes(big_model(family), tok, facts) <= 2, "the unedited model already says the targets"
    hits = successes(run.model, tok, facts)
    assert hits >= math.ceil(0.9 * len(facts)), f"{family}/{method}: {hits}/16 targets decoded"
    assert run.config.layers == (0, 1)
    assert changed(run.model, run.before) == rewrite_names(run.model, run.config.layers)
    assert run.flags_after == run.flags_before
    assert run.result.applied


@pytest.mark.parametrize(("family", "method"), BIG_CASES)
def test_result_stats_respect_the_settings(
    big_edit: Callable[[str, str], BigEdit], family: str, method: str
) -> None:
    run = big_edit(family, method)
    res, cfg = run.result, run.config
    assert [f.subject for f in res.facts] == [f.subject for f in facts16()]
    assert res.config == cfg
    assert res.templates[0] == "{}" and len(res.templates) == 1 + len(cfg.template_seeds)
    assert len(res.stats) == 16
    assert res.deltas.shape == (16, 64) and res.deltas.dtype == torch.float32
    for i, s in enumerate(res.stats):
        assert 0 <= s.steps <= cfg.v_num_grad_steps - 1
        assert all(math.isfinite(v) for v in (s.loss, s.nll, s.delta_norm, s.h_norm, s.key_norm))
        assert s.delta_norm <= s.radius * (1 + 1e-5)
        base = s.key_norm if cfg.clamp == "key_norm" else s.h_norm
        assert s.radius == pytest.approx(cfg.clamp_factor * base, rel=1e-6)
        assert float(res.deltas[i].norm()) == pytest.approx(s.delta_norm, rel=1e-5)
        assert s.nll < math.log(VOCAB), "the residual did not lower the target NLL below uniform"
        if method == "memit":
            assert s.alignment_kl == 0 and s.topm_mse == 0
    assert [u.layer for u in res.updates] == list(cfg.layers)
    for u in res.updates:
        assert u.shares.shape == (16, 64) and u.solved_keys.shape == (16, 256)
    assert [w.layer for w in res.weights] == list(cfg.layers)
    assert all(w.original_sha256 != w.edited_sha256 for w in res.weights)
    report = res.misalignment
    assert report is not None and len(report) == 16
    for name in ("scores", "reverse_scores", "overlap", "topm_mse", "key_neighbors"):
        assert getattr(report, name).shape[0] == 16
    assert report.top_m == 15
    summary = res.summary()
    assert summary["facts"] == 16 and summary["method"] == method
    assert summary["misalignment_total"] == pytest.approx(report.total)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eamet_is_better_aligned_than_memit(big_edit: Callable[[str, str], BigEdit], family: str) -> None:
    # Measured on model seeds 0, 1, 2: total A = 0.5-1.6 (EAMET) vs 25-55 (MEMIT), mean reverse KL
    # 0.04-0.12 vs 1.6-3.0, so a factor 4 leaves a wide margin.
    e = big_edit(family, "eamet").result.misalignment
    m = big_edit(family, "memit").result.misalignment
    assert e is not None and m is not None
    assert e.total < 0.25 * m.total
    assert e.reverse_scores.mean() < 0.25 * m.reverse_scores.mean()


# ---------------------------------------------------------------------------------------------------
# undo, save / load / apply


@pytest.mark.parametrize(("family", "method"), [("gpt2", "eamet"), ("llama", "memit")])
def test_undo_save_load_apply_round_trip(
    tok: Any, stats_dir: Path, tmp_path: Path, family: str, method: str
) -> None:
    model = small_model(family)
    cfg = small_config(model, method)
    before = snapshot(model)
    res = make_editor(model, tok, cfg, stats_dir).edit(small_facts(4), progress=False)
    edited = snapshot(model)
    assert changed(model, before) == rewrite_names(model, cfg.layers)

    path = tmp_path / "edit.safetensors"
    res.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]  # no temporary left behind
    loaded = EditResult.load(path)
    assert not loaded.applied
    assert loaded.facts == res.facts and loaded.config == res.config and loaded.templates == res.templates
    assert loaded.stats == res.stats and loaded.arch == res.arch and loaded.tokens == res.tokens
    assert [vars(w) for w in loaded.weights] == [vars(w) for w in res.weights]
    assert bit_equal(loaded.deltas, res.deltas)
    for a, b in zip(loaded.updates, res.updates, strict=True):
        assert (a.layer, a.path) == (b.layer, b.path)
        assert bit_equal(a.shares, b.shares) and bit_equal(a.solved_keys, b.solved_keys)
    assert loaded.misalignment is not None and res.misalignment is not None
    assert report_arrays_equal(loaded.misalignment, res.misalignment)

    fresh = small_model(family)
    assert same_weights(fresh, model) is False
    assert loaded.apply(fresh) is loaded and loaded.applied
    assert same_weights(fresh, model), "re-applied edit differs from the original edit"
    with pytest.raises(EditMismatchError):
        loaded.apply(fresh)  # already applied
    loaded.undo()
    assert changed(fresh, before) == set() and not loaded.applied
    with pytest.raises(EditMismatchError):
        loaded.undo()  # not applied any more

    res.undo()
    assert changed(model, before) == set()
    res.apply(model)  # a result taken back can be applied again, bit for bit
    assert changed(model, edited) == set()
    res.undo()
    assert changed(model, before) == set()


@pytest.fixture(scope="module")
def saved_gpt2_edit(tok: Any, stats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = small_model("gpt2")
    res = make_editor(model, tok, small_config(model), stats_dir).edit(small_facts(4), progress=False)
    path = tmp_path_factory.mktemp("saved") / "gpt2.safetensors"
    res.save(path)
    return path


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: small_model("llama"), id="other-architecture"),
        pytest.param(lambda: small_model("gpt2", ffn=128), id="other-shapes"),
        pytest.param(lambda: small_model("gpt2", seed=1), id="other-weights"),
        pytest.param(lambda: small_model("gpt2", n_layer=1), id="fewer-layers"),
    ],
)
def test_apply_refuses_a_different_model(saved_gpt2_edit: Path, other: Callable[[], nn.Module]) -> None:
    loaded = EditResult.load(saved_gpt2_edit)
    model = other()
    before = snapshot(model)
    with pytest.raises(EditMismatchError):
        loaded.apply(model)
    assert changed(model, before) == set()
    assert not loaded.applied
    right = small_model("gpt2")  # the refusal left the result usable
    loaded.apply(right)
    assert changed(right, snapshot(small_model("gpt2"))) == rewrite_names(right, loaded.config.layers)


def test_load_rejects_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "not-an-edit.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CacheError):
        EditResult.load(path)


# ---------------------------------------------------------------------------------------------------
# editing an edited model


def test_second_edit_stacks_and_undoes_in_reverse_order(tok: Any, stats_dir: Path, tmp_path: Path) -> None:
    model = small_model("gpt2")
    cfg = small_config(model)
    s0 = snapshot(model)
    first = make_editor(model, tok, cfg, stats_dir).edit(small_facts(4), progress=False)
    s1 = snapshot(model)
    second = make_editor(model, tok, cfg, stats_dir).edit(
        small_facts(4, prompt="mother tongue : {}", offset=8), progress=False
    )
    s2 = snapshot(model)
    layers = rewrite_names(model, cfg.layers)
    assert changed(model, s1) == layers and changed(model, s0) == layers
    assert [w.original_sha256 for w in second.weights] == [w.edited_sha256 for w in first.weights]

    with pytest.raises(EditMismatchError):
        first.undo()  # the second edit is on top of it
    assert changed(model, s2) == set() and first.applied and second.applied

    # The saved second edit applies only on top of the first.
    first.save(tmp_path / "first.safetensors")
    second.save(tmp_path / "second.safetensors")
    fresh = small_model("gpt2")
    loaded_second = EditResult.load(tmp_path / "second.safetensors")
    with pytest.raises(EditMismatchError):
        loaded_second.apply(fresh)
    assert changed(fresh, s0) == set()
    EditResult.load(tmp_path / "first.safetensors").apply(fresh)
    loaded_second.apply(fresh)
    assert changed(fresh, s2) == set()

    second.undo()
    assert changed(model, s1) == set()
    first.undo()
    assert changed(model, s0) == set()


# ---------------------------------------------------------------------------------------------------
# all-or-nothing


def _fail_on_call(
    target: Callable[..., Any],
    n: int,
    exc: BaseException,
    seen: list[Any],
    on_fault: Callable[[], None] | None = None,
) -> Callable[..., Any]:
    """``target`` recording its calls in ``seen``, raising ``exc`` on the n-th (after ``on_fault``)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(args)
        if len(seen) == n:
            if on_fault is not None:
                on_fault()
            raise exc
        return target(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    ("where", "exc"),
    [
        ("solve_layer", RuntimeError("injected")),
        ("apply_update", RuntimeError("injected")),
        ("apply_update", KeyboardInterrupt()),
        ("optimize", RuntimeError("injected")),
        ("optimize", KeyboardInterrupt()),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_failure_mid_edit_changes_nothing(
    tok: Any, stats_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str, exc: BaseException
) -> None:
    model = small_model("gpt2")
    cfg = small_config(model, "eamet")
    editor = make_editor(model, tok, cfg, stats_dir)
    flags_before = odd_flags(model)
    before = snapshot(model)
    seen: list[Any] = []
    first_layer = next(iter(rewrite_names(model, cfg.layers[:1])))
    layer0_changed_at_fault: list[bool] = []
    if where == "optimize":
        monkeypatch.setattr(
            ResidualOptimizer, "optimize", _fail_on_call(ResidualOptimizer.optimize, 2, exc, seen)
        )
    else:

        def layer0_written() -> None:  # failing on the second layer: is the first one already written?
            weight = model.state_dict()[first_layer]
            layer0_changed_at_fault.append(not bit_equal(weight, before[first_layer]))

        wrapped = _fail_on_call(getattr(editor_module, where), 2, exc, seen, layer0_written)
        monkeypatch.setattr(editor_module, where, wrapped)
    with pytest.raises(type(exc)):
        editor.edit(small_facts(4), progress=False)
    assert len(seen) == 2, "the fault was not reached"
    if where != "optimize":  # layer 0 is solved and written before layer 1 is solved
        assert layer0_changed_at_fault == [True], "the first layer was not written before the fault"
    assert changed(model, before) == set()
    assert flags(model) == flags_before

    # Nothing half-done is left in the editor either: a clean edit now equals one on a fresh model.
    monkeypatch.undo()
    model.eval()
    editor.edit(small_facts(4), progress=False)
    reference = small_model("gpt2")
    make_editor(reference, tok, cfg, stats_dir).edit(small_facts(4), progress=False)
    assert same_weights(model, reference)


def test_apply_failure_changes_nothing(saved_gpt2_edit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = EditResult.load(saved_gpt2_edit)
    model = small_model("gpt2")
    before = snapshot(model)
    seen: list[Any] = []
    monkeypatch.setattr(
        results_module,
        "apply_update",
        _fail_on_call(results_module.apply_update, 2, KeyboardInterrupt(), seen),
    )
    with pytest.raises(KeyboardInterrupt):
        loaded.apply(model)
    assert len(seen) == 2
    assert changed(model, before) == set() and not loaded.applied


def test_successful_edit_restores_flags(tok: Any, stats_dir: Path) -> None:
    model = small_model("llama")
    flags_before = odd_flags(model)
    make_editor(model, tok, small_config(model), stats_dir).edit(small_facts(3), progress=False)
    assert flags(model) == flags_before


# ---------------------------------------------------------------------------------------------------
# resuming from a residual store


@pytest.mark.parametrize("method", ["eamet", "memit"])
def test_resume_after_kill_matches_uninterrupted_run(
    tok: Any, stats_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    n, k = 6, 2
    facts = small_facts(n)
    ref_model = small_model("gpt2")
    cfg = small_config(ref_model, method)
    reference = make_editor(ref_model, tok, cfg, stats_dir).edit(facts, progress=False)

    store = tmp_path / "store"
    killed_model = small_model("gpt2")
    before = snapshot(killed_model)
    seen: list[Any] = []
    monkeypatch.setattr(
        ResidualOptimizer,
        "optimize",
        _fail_on_call(ResidualOptimizer.optimize, k + 1, KeyboardInterrupt(), seen),
    )
    with pytest.raises(KeyboardInterrupt):
        make_editor(killed_model, tok, cfg, stats_dir).edit(facts, residual_store=store, progress=False)
    assert changed(killed_model, before) == set()

    calls: list[int] = []
    real = ResidualOptimizer.optimize

    def counting(self: ResidualOptimizer, facts: range, saved: torch.Tensor) -> Any:
        calls.extend(facts)
        return real(self, facts, saved)

    monkeypatch.setattr(ResidualOptimizer, "optimize", counting)
    model = small_model("gpt2")
    resumed = make_editor(model, tok, cfg, stats_dir).edit(facts, residual_store=store, progress=False)
    assert calls == list(range(k, n)), "the resumed run re-optimised saved facts"
    assert bit_equal(resumed.deltas, reference.deltas)
    assert same_weights(model, ref_model)
    assert [s.reused for s in resumed.stats] == [True] * k + [False] * (n - k)
    for a, b in zip(resumed.stats, reference.stats, strict=True):
        assert {**a.to_dict(), "seconds": 0, "reused": 0} == {**b.to_dict(), "seconds": 0, "reused": 0}
    assert resumed.templates == reference.templates

    # The finished store replays everything, also under the older name checkpoint_dir.
    calls.clear()
    again_model = small_model("gpt2")
    with pytest.warns(DeprecationWarning, match="residual_store"):
        make_editor(again_model, tok, cfg, stats_dir).edit(facts, checkpoint_dir=store, progress=False)
    assert calls == [] and same_weights(again_model, ref_model)

    # Facts 3..8: MEMIT reuses the three it shares (its residuals are independent); EAMET's first fact
    # already sees other residuals before it, so it reuses none. Nothing is mixed up either way.
    calls.clear()
    shifted = small_facts(n, offset=3)
    other, fresh_model = small_model("gpt2"), small_model("gpt2")
    fresh = make_editor(fresh_model, tok, cfg, stats_dir).edit(shifted, progress=False)
    calls.clear()
    stored = make_editor(other, tok, cfg, stats_dir).edit(shifted, residual_store=store, progress=False)
    assert calls == (list(range(3, n)) if method == "memit" else list(range(n)))
    assert torch.allclose(stored.deltas, fresh.deltas, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# every registered family tiny.py can build

FAMILIES = sorted(set(TINY_FAMILIES) & set(eamet.known_architectures()))
SENTENCEPIECE = {"llama", "mistral", "gemma"}  # families whose real tokenizers are SentencePiece


def test_family_list_is_not_empty() -> None:
    assert {"gpt2", "llama", "gptj", "falcon"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_edits_and_undoes(stats_dir: Path, family: str) -> None:
    tokenizer = sentencepiece_tokenizer(VOCAB) if family in SENTENCEPIECE else bpe_tokenizer(False, VOCAB)
    model = small_model(family)
    # Layers (1, 2), not for_model's (0, 1): in the parallel-attention rotary families (gptj, gpt_neox,
    # phi, falcon) block 0's MLP input is a function of the token alone, so C over 50 short lines has
    # rank <= the distinct tokens seen (< d_ff) and the solve is rightly refused. Falcon's d_ff is
    # 4 * hidden = 128, more than 50 lines' keys span: it gets 400.
    cfg = small_config(model, "memit", layers=(1, 2), mom2_n_samples=400 if family == "falcon" else 50)
    before, flags_before = snapshot(model), flags(model)
    facts = small_facts(4)
    res = make_editor(model, tokenizer, cfg, stats_dir).edit(facts, progress=False)
    assert changed(model, before) == rewrite_names(model, (1, 2))
    assert flags(model) == flags_before
    assert len(res.stats) == 4
    for s in res.stats:
        assert 0 <= s.steps <= 4 and math.isfinite(s.loss) and s.delta_norm <= s.radius * (1 + 1e-5)
    assert res.arch["model_type"] == family
    res.undo()
    assert changed(model, before) == set()


# ---------------------------------------------------------------------------------------------------
# bad inputs are refused before any work


@pytest.fixture
def guarded(tok: Any, tmp_path: Path) -> Any:
    """An editor on a tiny GPT-2 with its own empty cache; checks afterwards that nothing was done."""
    model = small_model("gpt2")
    before = snapshot(model)
    cache = tmp_path / "cache"
    editor = make_editor(model, tok, small_config(model), cache)
    yield editor
    assert changed(model, before) == set()
    assert not cache.exists() or not any(cache.iterdir()), "work started before the input was checked"


def test_empty_facts_are_refused(guarded: Editor) -> None:
    with pytest.raises(FactError):
        guarded.edit([], progress=False)


def test_prompt_without_slot_is_refused(guarded: Editor) -> None:
    with pytest.raises(FactError):
        Fact("capital city :", "Marie Curie", "Paris")
    bad = {"prompt": "capital city :", "subject": "Marie Curie", "target": "Paris"}
    with pytest.raises(FactError) as info:
        guarded.edit([*small_facts(2), bad], progress=False)
    assert info.value.row == 2


@pytest.mark.parametrize(("kind", "target"), [("conflict", "Rome"), ("duplicate", None)])
def test_repeated_facts_are_refused_naming_both(guarded: Editor, kind: str, target: str | None) -> None:
    facts = small_facts(3)
    repeat = Fact(facts[1].prompt, facts[1].subject, target or facts[1].target)
    assert repeat.target != facts[1].target or kind == "duplicate"
    with pytest.raises(FactError) as info:
        guarded.edit([*facts, repeat], progress=False)
    message = str(info.value)
    assert info.value.row == 3
    assert "fact 3" in message and "fact 1" in message
    assert kind in message


def test_layers_beyond_the_model_are_refused(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")  # 4 blocks
    with pytest.raises(ParameterError) as info:
        make_editor(model, tok, small_config(model, layers=(3, 4)), tmp_path)
    assert info.value.argument == "layers"


def test_unsupported_architecture_is_refused_listing_known(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")
    cfg = small_config(model)
    model.config.model_type = "made_up_lm"
    assert model.config.model_type == "made_up_lm"
    for kwargs in ({}, {"config": cfg}):
        with pytest.raises(UnsupportedArchitectureError) as info:
            Editor(model, tok, corpus=CORPUS, cache_dir=tmp_path, **kwargs)
        message = str(info.value)
        assert "made_up_lm" in message
        assert all(name in message for name in eamet.known_architectures())


def test_method_conflicting_with_config_is_refused(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")
    with pytest.raises(ParameterError) as info:
        Editor(model, tok, config=small_config(model, "memit"), method="eamet", cache_dir=tmp_path)
    assert info.value.argument == "method"
    editor = Editor(model, tok, config=small_config(model, "memit"), method="memit", cache_dir=tmp_path)
    assert editor.config.method == "memit"
