"""Guards around an edit: failures after the solve, fingerprints of residual stores and statistics,
devices, numerically broken solves, fact-token bounds, foreign store directories and bad template seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import eamet.edit.editor as editor_module
from eamet import EditConfig
from eamet.base.errors import CacheError, FactError, ParameterError, SolveError
from eamet.edit.editor import _same_device
from eamet.edit.moment_collector import SecondMomentCollector
from eamet.edit.solve import LayerUpdate, apply_update, solve_layer
from eamet.edit.store import ResidualStore
from eamet.model.fingerprint import model_fingerprint, model_source
from eamet.model.parts import ModelParts
from eamet.model.tokens import TokenAdapter
from editing_helpers import bit_equal, changed, make_editor, small_config, small_facts, small_model, snapshot
from tiny import bpe_tokenizer, sentencepiece_tokenizer

VOCAB = 256


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer(add_bos=False, vocab_size=VOCAB)


@pytest.mark.parametrize(
    "exc", [RuntimeError("injected"), KeyboardInterrupt()], ids=lambda e: type(e).__name__
)
def test_failure_after_the_update_restores_the_weights(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    model = small_model("gpt2")
    editor = make_editor(model, tok, small_config(model), tmp_path)
    before = snapshot(model)
    updated: list[bool] = []
    real_update = editor._update

    def update_then_note(*args: Any, **kwargs: Any) -> Any:
        out = real_update(*args, **kwargs)
        updated.append(bool(changed(model, before)))
        return out

    def failing_result(*_a: Any, **_k: Any) -> Any:
        raise exc

    monkeypatch.setattr(editor, "_update", update_then_note)
    monkeypatch.setattr(editor_module, "EditResult", failing_result)
    with pytest.raises(type(exc)):
        editor.edit(small_facts(4), progress=False)
    assert updated == [True], "the weights were not written before the fault"
    assert changed(model, before) == set()


def test_a_failing_report_does_not_fail_the_edit(
    tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eamet.base.errors import ZeroNormError

    def broken(*_a: Any, **_k: Any) -> Any:
        raise ZeroNormError("row 3 of keys has zero norm")

    model = small_model("gpt2")
    monkeypatch.setattr(editor_module, "misalignment", broken)
    with pytest.warns(UserWarning, match="zero norm"):
        result = make_editor(model, tok, small_config(model), tmp_path).edit(small_facts(4), progress=False)
    assert result.misalignment is None
    result.undo()


def test_residual_store_keys_cover_the_head_and_the_tokenizer(tok: Any, tmp_path: Path) -> None:
    model = small_model("llama")
    editor = make_editor(model, sentencepiece_tokenizer(), small_config(model), tmp_path)

    def base(of: Any = editor) -> str:
        return str(of._residual_base(model_fingerprint(model, of.parts), ["{}"], torch.float32))

    first = base()
    assert base() == first
    for weight in (model.lm_head.weight, model.model.norm.weight, editor.parts.rewrite_weight(3)):
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(1e-3)
        assert base() != first
        with torch.no_grad():
            weight.copy_(saved)
    other_tokenizer = make_editor(
        model, sentencepiece_tokenizer(vocab_size=200), small_config(model), tmp_path
    )
    assert base(other_tokenizer) != first


def test_fingerprints_hash_weights_even_for_hub_models() -> None:
    model = small_model("llama")
    parts = ModelParts(model)
    hashed = model_fingerprint(model, parts, 1)
    assert model_source(model) is None
    model.config.name_or_path, model.config._commit_hash = "org/tiny", "0123abcd"
    assert model_source(model) == "org/tiny@0123abcd"
    assert model_fingerprint(model, parts, 1) == hashed  # a name is recorded, never trusted
    assert model_fingerprint(model.to(torch.float64), parts, 1) != hashed  # another dtype, another model


def test_statistics_record_the_source_and_key_on_the_tokenizer(tmp_path: Path) -> None:
    model = small_model("llama")
    model.config.name_or_path, model.config._commit_hash = "org/tiny", "0123abcd"
    parts = ModelParts(model)

    def collector(tokenizer: Any) -> SecondMomentCollector:
        return SecondMomentCollector(
            model,
            parts,
            TokenAdapter(tokenizer),
            corpus=["some text for the keys", "and a little more of it"],
            n_samples=2,
            max_length=32,
            cache_dir=tmp_path,
            progress=False,
        )

    first = collector(sentencepiece_tokenizer())
    acc = first.moments([1])[1]
    assert acc.metadata["source"] == "org/tiny@0123abcd"
    assert first.moments([1])[1].metadata == acc.metadata  # found again: "source" is not part of the key
    other = collector(sentencepiece_tokenizer(vocab_size=200))
    corpus_id = first.corpus_id()
    assert first.settings(1, corpus_id)["tokenizer"] != other.settings(1, corpus_id)["tokenizer"]
    assert first.cache_path(first.settings(1, corpus_id)) != other.cache_path(other.settings(1, corpus_id))


def test_a_reused_editor_recollects_statistics_after_the_weights_change(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")
    cfg = small_config(model)
    editor = make_editor(model, tok, cfg, tmp_path)
    first = editor.covariance(progress=False)
    again = editor.covariance(progress=False)
    assert all(again[layer] is first[layer] for layer in cfg.layers)  # kept in memory
    result = editor.edit(small_facts(4), progress=False)
    after = editor.covariance(progress=False)
    # The first edited layer's keys do not depend on its own rewrite weight; the later ones' do.
    assert after[cfg.layers[0]] is first[cfg.layers[0]]
    assert all(after[layer] is not first[layer] for layer in cfg.layers[1:])
    assert len(cfg.layers) > 1
    result.undo()


def test_devices() -> None:
    cpu = torch.device("cpu")
    assert _same_device(torch.device("cpu"), cpu)
    assert not _same_device(torch.device("meta"), cpu)
    assert _same_device(torch.device("meta"), torch.device("meta"))


def test_a_model_on_several_devices_is_refused(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, device="meta")
    with pytest.raises(ParameterError, match="meta"):
        make_editor(model, tok, small_config(model), tmp_path)


def test_a_device_other_than_the_models_is_refused(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")
    with pytest.raises(ParameterError, match="device"):
        editor_module.Editor(model, tok, config=small_config(model), corpus=["a b"], device="meta")


def test_solves_that_break_numerically_raise_solve_error() -> None:
    keys = torch.randn(4, 6, dtype=torch.float64)
    keys[:, 4:] = 0  # no key and no C in the last two directions: exactly singular
    singular = torch.zeros(6, 6, dtype=torch.float64)
    with pytest.raises(SolveError, match="singular"):
        solve_layer(singular, keys, 1.0, solver="inverse", layer=2)
    with pytest.raises(SolveError, match="positive definite"):
        solve_layer(singular, keys, 1.0, layer=2)
    bad = torch.eye(6, dtype=torch.float64)
    bad[0, 0] = float("nan")
    with pytest.raises(SolveError, match="NaN"):
        solve_layer(bad, keys, 1.0, layer=2)


def test_an_update_that_overflows_the_weight_changes_nothing() -> None:
    weight = torch.ones(3, 4, dtype=torch.float16)
    before = weight.clone()
    huge = LayerUpdate(0, "w", torch.full((2, 3), 1e5), torch.full((2, 4), 1e5))
    with pytest.raises(SolveError, match="NaN or Inf"):
        apply_update(weight, huge, "out_in")
    assert bit_equal(weight, before)


def test_a_fact_token_outside_the_prompt_is_a_fact_error(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=VOCAB))
    n = len(tokens.encode("capital city : Alan Turing"))
    monkeypatch.setattr(TokenAdapter, "fact_index", lambda *_a, **_k: n)
    with pytest.raises(FactError, match="outside"):
        tokens.prompt("capital city : {}", "Alan Turing")


@pytest.mark.parametrize("marker", ["[1, 2]", '{"format": 99}', "{"])
def test_a_foreign_store_marker_is_a_cache_error(tmp_path: Path, marker: str) -> None:
    (tmp_path / "eamet-residual-store.json").write_text(marker, encoding="utf-8")
    with pytest.raises(CacheError, match=r"eamet-residual-store\.json"):
        ResidualStore(tmp_path)


def test_a_directory_of_something_else_is_not_made_a_store(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"fingerprint": "a"}), encoding="utf-8")
    with pytest.raises(CacheError, match="not a residual store"):
        ResidualStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.parametrize("seeds", ["The", ("The", ""), ("The", "  "), ("The", 3)])
def test_bad_template_seeds(seeds: Any) -> None:
    with pytest.raises(ParameterError, match="template_seeds"):
        EditConfig(template_seeds=seeds)
