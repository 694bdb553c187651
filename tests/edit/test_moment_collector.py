"""C = E[k kᵀ] of the rewrite modules' inputs over a corpus (``eamet.edit.moment_collector``, algorithm.md
§6.3): against a brute-force torch computation on tiny models, the on-disk cache (hits, corruption, what its
name depends on), the corpus sources and their errors."""

from __future__ import annotations

import json
import shutil
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from eamet.base.errors import CorpusError, MissingDependencyError
from eamet.edit.corpus import load_corpus
from eamet.edit.moment_collector import SecondMomentCollector
from eamet.kernels.second_moment import SecondMoment
from eamet.model.parts import ModelParts
from eamet.model.tokens import TokenAdapter
from tiny import bpe_tokenizer, corpus, sentencepiece_tokenizer, tiny_model

MAX_LENGTH = 8  # shorter than most corpus lines: truncation is exercised
TEXTS = list(corpus()[:30])
LAYERS = [1, 2]

# family -> (tokenizer factory, path of block l's rewrite module, whether the tokenizer prepends a BOS)
SETUPS: dict[str, tuple[Callable[[], Any], Callable[[nn.Module, int], nn.Module], bool]] = {
    "llama": (sentencepiece_tokenizer, lambda m, i: m.model.layers[i].mlp.down_proj, True),
    "gpt2": (lambda: bpe_tokenizer(False), lambda m, i: m.transformer.h[i].mlp.c_proj, False),
}


def _model(family: str) -> nn.Module:
    return tiny_model(family, vocab_size=256, n_layer=4, hidden=32, ffn=64)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {family: _model(family) for family in SETUPS}


def _record_collect_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The layer lists of every corpus pass that ``SecondMomentCollector`` makes from now on."""
    calls: list[list[int]] = []
    original = SecondMomentCollector._collect

    def spy(self: SecondMomentCollector, layers: list[int], texts: list[str]) -> dict[int, SecondMoment]:
        calls.append(list(layers))
        return original(self, layers, texts)

    monkeypatch.setattr(SecondMomentCollector, "_collect", spy)
    return calls


def _collector(
    model: nn.Module,
    tokenizer: Any,
    cache_dir: Path,
    *,
    corpus: Any = TEXTS,
    bos: str = "native",
    **kw: Any,
) -> SecondMomentCollector:
    settings: dict[str, Any] = {
        "n_samples": 1000,
        "max_length": MAX_LENGTH,
        "batch_tokens": 64,  # several batches of several documents
        "progress": False,
        **kw,
    }
    return SecondMomentCollector(
        model,
        ModelParts(model),
        TokenAdapter(tokenizer, bos=bos),  # type: ignore[arg-type]
        corpus=corpus,
        cache_dir=cache_dir,
        **settings,
    )


def _brute_force(
    model: nn.Module,
    rewrite: Callable[[nn.Module, int], nn.Module],
    docs: Sequence[Sequence[int]],
    layer: int,
) -> tuple[np.ndarray, int]:
    """Each document alone through the full model, the rewrite module's input captured by a hook here."""
    rows: list[torch.Tensor] = []
    handle = rewrite(model, layer).register_forward_pre_hook(
        lambda _m, args: rows.append(args[0][0].detach())
    )
    try:
        with torch.no_grad():
            for ids in docs:
                model(input_ids=torch.tensor([list(ids)]))
    finally:
        handle.remove()
    x = torch.cat(rows).double()
    return (x.T @ x / x.shape[0]).numpy(), int(x.shape[0])


def _docs(tokenizer: Any, texts: Sequence[str], bos: bool, max_length: int = MAX_LENGTH) -> list[list[int]]:
    prefix = [tokenizer.bos_token_id] if bos else []
    return [(prefix + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length] for t in texts]


def _assert_moment_close(acc: SecondMoment, expected: np.ndarray) -> None:
    # float32 products summed in float64, from a padded batched forward: ~1e-6 relative.
    np.testing.assert_allclose(acc.moment(), expected, rtol=2e-5, atol=2e-6 * np.abs(expected).max())


# -- values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_moments_match_brute_force_in_one_pass(
    family: str, models: dict[str, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tok, rewrite, native_bos = SETUPS[family]
    tokenizer, model = make_tok(), models[family]
    calls = _record_collect_calls(monkeypatch)
    found = _collector(model, tokenizer, tmp_path).moments(LAYERS)
    assert calls == [LAYERS]  # both layers from one pass over the corpus
    assert sorted(found) == LAYERS
    docs = _docs(tokenizer, TEXTS, native_bos)
    assert any(len(tokenizer(t)["input_ids"]) > MAX_LENGTH for t in TEXTS)
    for layer in LAYERS:
        expected, n = _brute_force(model, rewrite, docs, layer)
        acc = found[layer]
        assert acc.count == n == sum(len(d) for d in docs)
        assert acc.dim == 64 and acc.input_dtype == "float32"
        assert acc.metadata["tokens"] == n
        _assert_moment_close(acc, expected)
    # The two layers differ (a layer mix-up would not be caught otherwise).
    assert not np.allclose(found[1].moment(), found[2].moment(), rtol=1e-2)


def test_bos_policy_changes_counts_and_moments(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model, rewrite = sentencepiece_tokenizer(), models["llama"], SETUPS["llama"][1]
    never = _collector(model, tokenizer, tmp_path, bos="never", use_cache=False).moments([1])[1]
    docs = _docs(tokenizer, TEXTS, bos=False)
    expected, n = _brute_force(model, rewrite, docs, 1)
    assert never.count == n
    _assert_moment_close(never, expected)
    native = _collector(model, tokenizer, tmp_path, bos="native", use_cache=False).moments([1])[1]
    # The native policy prepends a BOS, which is counted like any token (and takes a truncation slot).
    assert native.count == sum(len(d) for d in _docs(tokenizer, TEXTS, bos=True))
    assert not np.allclose(native.moment(), never.moment(), rtol=1e-3)


def test_float64_products(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model, rewrite = bpe_tokenizer(False), models["gpt2"], SETUPS["gpt2"][1]
    acc = _collector(model, tokenizer, tmp_path, dtype="float64").moments([2])[2]
    assert acc.input_dtype == "float64"
    expected, n = _brute_force(model, rewrite, _docs(tokenizer, TEXTS, bos=False), 2)
    assert acc.count == n
    _assert_moment_close(acc, expected)


def test_n_samples_takes_the_first_documents(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model, rewrite = bpe_tokenizer(False), models["gpt2"], SETUPS["gpt2"][1]
    texts = ["", "   ", *TEXTS]  # blank documents are skipped, not counted
    acc = _collector(model, tokenizer, tmp_path, corpus=texts, n_samples=5).moments([1])[1]
    expected, n = _brute_force(model, rewrite, _docs(tokenizer, TEXTS[:5], bos=False), 1)
    assert acc.count == n
    _assert_moment_close(acc, expected)


def test_batch_tokens_changes_neither_result_nor_cache_name(
    models: dict[str, nn.Module], tmp_path: Path
) -> None:
    tokenizer, model = bpe_tokenizer(False), models["gpt2"]
    small = _collector(model, tokenizer, tmp_path / "a", batch_tokens=8)
    large = _collector(model, tokenizer, tmp_path / "b", batch_tokens=1 << 16)
    a, b = small.moments([1])[1], large.moments([1])[1]
    assert a.count == b.count
    np.testing.assert_allclose(a.moment(), b.moment(), rtol=1e-5, atol=1e-7)
    cid = small.corpus_id()
    assert small.cache_path(small.settings(1, cid)).name == large.cache_path(large.settings(1, cid)).name


# -- cache ------------------------------------------------------------------------------------------------


def _forbid_collect(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: SecondMomentCollector, layers: list[int], texts: list[str]) -> Any:
        raise AssertionError(f"collected {layers} although a cache file exists")

    monkeypatch.setattr(SecondMomentCollector, "_collect", boom)


def test_second_call_hits_the_cache(
    models: dict[str, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, model = sentencepiece_tokenizer(), models["llama"]
    first = _collector(model, tokenizer, tmp_path).moments(LAYERS)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and all(f.name.startswith("llama-layer") for f in files)
    _forbid_collect(monkeypatch)
    again = _collector(model, tokenizer, tmp_path).moments(LAYERS)
    for layer in LAYERS:
        assert again[layer].count == first[layer].count
        np.testing.assert_array_equal(again[layer].moment(), first[layer].moment())
        assert again[layer].metadata == first[layer].metadata


def test_only_missing_layers_are_collected(
    models: dict[str, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, model = sentencepiece_tokenizer(), models["llama"]
    _collector(model, tokenizer, tmp_path).moments([1])
    calls = _record_collect_calls(monkeypatch)
    both = _collector(model, tokenizer, tmp_path).moments([1, 3])
    assert calls == [[3]] and sorted(both) == [1, 3]


def test_use_cache_false_writes_and_reads_nothing(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model = bpe_tokenizer(False), models["gpt2"]
    _collector(model, tokenizer, tmp_path).moments([1])
    calls: list[int] = []
    collector = _collector(model, tokenizer, tmp_path / "none", use_cache=False)
    original = collector._collect
    collector._collect = lambda layers, texts: calls.append(1) or original(layers, texts)  # type: ignore[method-assign]
    collector.moments([1])
    assert calls == [1] and not (tmp_path / "none").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in (len(data) - 9, len(data) - 100, len(data) - 300):  # inside the float64 payload
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_corrupt_cache_is_detected_and_rebuilt(
    damage: Callable[[Path], None], models: dict[str, nn.Module], tmp_path: Path
) -> None:
    tokenizer, model = bpe_tokenizer(False), models["gpt2"]
    first = _collector(model, tokenizer, tmp_path).moments([2])[2]
    (path,) = tmp_path.glob("*.safetensors")
    good = path.read_bytes()
    damage(path)
    assert path.read_bytes() != good
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = _collector(model, tokenizer, tmp_path).moments([2])[2]
    assert rebuilt.count == first.count
    np.testing.assert_array_equal(rebuilt.moment(), first.moment())
    # The file was rewritten and now loads again. (Not byte-compared: the core writes the safetensors
    # header's metadata map in no fixed order.)
    reloaded = SecondMoment.load(path)
    assert reloaded.count == first.count and reloaded.metadata == first.metadata
    np.testing.assert_array_equal(reloaded.moment(), first.moment())


def test_cache_file_with_other_settings_is_rebuilt(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model = bpe_tokenizer(False), models["gpt2"]
    other = _collector(model, tokenizer, tmp_path / "other", max_length=4).moments([1])[1]
    collector = _collector(model, tokenizer, tmp_path)
    target = collector.cache_path(collector.settings(1, collector.corpus_id()))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(next((tmp_path / "other").glob("*.safetensors")), target)  # as if the names collided
    with pytest.warns(UserWarning, match="different settings"):
        acc = collector.moments([1])[1]
    assert acc.metadata["max_length"] == MAX_LENGTH and acc.count > other.count
    assert SecondMoment.load(target).metadata["max_length"] == MAX_LENGTH


def test_cache_metadata_holds_every_setting(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model = sentencepiece_tokenizer(), models["llama"]
    collector = _collector(model, tokenizer, tmp_path)
    found = collector.moments(LAYERS)
    corpus_id = collector.corpus_id()
    for layer in LAYERS:
        settings = collector.settings(layer, corpus_id)
        assert {"model", "layer", "corpus", "n_samples", "max_length", "bos_prefix", "dtype"} <= set(settings)
        path = collector.cache_path(settings)
        stored = SecondMoment.load(path).metadata
        assert json.loads(json.dumps(settings)).items() <= stored.items()
        assert stored["tokens"] == found[layer].count
        assert stored["layer"] == layer and stored["module"] == f"model.layers.{layer}.mlp.down_proj"
        assert stored["bos_prefix"] == [1] and stored["max_length"] == MAX_LENGTH
        assert path.name.startswith(f"llama-layer{layer}-")


def _name(collector: SecondMomentCollector, layer: int = 1) -> str:
    return collector.cache_path(collector.settings(layer, collector.corpus_id())).name


def test_cache_name_depends_on_every_setting(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model = bpe_tokenizer(False), models["gpt2"]
    base = _name(_collector(model, tokenizer, tmp_path))
    assert base == _name(_collector(model, tokenizer, tmp_path))  # stable
    variants = {
        "n_samples": _collector(model, tokenizer, tmp_path, n_samples=10),
        "max_length": _collector(model, tokenizer, tmp_path, max_length=16),
        "corpus": _collector(model, tokenizer, tmp_path, corpus=[*TEXTS[:-1], "Another text."]),
        "bos": _collector(model, tokenizer, tmp_path, bos="always"),
        "dtype": _collector(model, tokenizer, tmp_path, dtype="float64"),
    }
    names = {what: _name(c) for what, c in variants.items()}
    assert all(name != base for name in names.values()), names
    assert len(set(names.values())) == len(names)
    assert _name(_collector(model, tokenizer, tmp_path), layer=2) != base
    # bos="never" on a tokenizer that adds no BOS is the same tokenisation: same statistics, same name.
    assert _name(_collector(model, tokenizer, tmp_path, bos="never")) == base


def test_cache_name_depends_on_weights_up_to_the_layer(tmp_path: Path) -> None:
    tokenizer, model = sentencepiece_tokenizer(), _model("llama")
    collector = _collector(model, tokenizer, tmp_path)
    base = _name(collector, layer=1)
    layers = model.model.layers

    def changed(param: torch.Tensor) -> str:
        saved = param.detach().clone()
        with torch.no_grad():
            param.add_(1e-3)
        try:
            return _name(collector, layer=1)
        finally:
            with torch.no_grad():
                param.copy_(saved)

    assert changed(layers[0].mlp.up_proj.weight) != base
    assert changed(layers[1].self_attn.q_proj.weight) != base
    assert changed(layers[1].mlp.gate_proj.weight) != base
    assert changed(model.model.embed_tokens.weight) != base
    assert changed(layers[0].mlp.down_proj.weight) != base
    # Later blocks, the layer's own rewrite weight (what an edit changes), the final norm and an untied
    # unembedding cannot change the keys at layer 1.
    assert changed(layers[2].mlp.up_proj.weight) == base
    assert changed(layers[3].self_attn.v_proj.weight) == base
    assert changed(layers[1].mlp.down_proj.weight) == base
    assert changed(model.model.norm.weight) == base
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert changed(model.lm_head.weight) == base
    assert _name(collector, layer=1) == base


def test_a_tied_unembedding_is_part_of_the_cache_name(tmp_path: Path) -> None:
    model = _model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    collector = _collector(model, bpe_tokenizer(add_bos=False), tmp_path)
    base = _name(collector, layer=1)
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)
    assert _name(collector, layer=1) != base


# -- corpus -----------------------------------------------------------------------------------------------


def test_corpus_sources_give_identical_moments(models: dict[str, nn.Module], tmp_path: Path) -> None:
    tokenizer, model = bpe_tokenizer(False), models["gpt2"]
    texts = TEXTS[:12]
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(texts[:6]) + "\n\n   \n" + "\n".join(texts[6:]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    jsonl.write_text("\n".join([*lines[:3], "", *lines[3:]]) + "\n", encoding="utf-8")
    results = {}
    for name, source in {"txt": txt, "jsonl": str(jsonl), "iter": iter(texts)}.items():
        results[name] = _collector(model, tokenizer, tmp_path / name, corpus=source).moments([1])[1]
    ref = results["iter"]
    for name in ("txt", "jsonl"):
        assert results[name].count == ref.count
        np.testing.assert_array_equal(results[name].moment(), ref.moment())
    assert load_corpus(txt, 100)[1] == texts
    assert load_corpus(jsonl, 100)[1] == texts
    assert load_corpus(jsonl, 5)[1] == texts[:5]


def test_corpus_id_changes_with_the_texts() -> None:
    a, texts = load_corpus(["one", "two"], 10)
    assert texts == ["one", "two"]
    assert a == load_corpus(("one", "two"), 10)[0]
    assert a != load_corpus(["one", "two!"], 10)[0]
    assert a != load_corpus(["one", "two", "three"], 10)[0]
    assert a == load_corpus(["one", "two", "three"], 2)[0]


def test_corpus_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="does not exist") as info:
        load_corpus(missing, 10)
    assert info.value.path == str(missing)
    for empty in ([], ["", "  ", "\n"]):
        with pytest.raises(CorpusError, match="no non-empty text"):
            load_corpus(empty, 10)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no non-empty text"):
        load_corpus(blank, 10)
    with pytest.raises(CorpusError, match="must be strings"):
        load_corpus(["fine", 3], 10)  # type: ignore[list-item]
    for bad in ('{"body": "no text field"}', "not json", '["a list"]'):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"text": "good line"}) + "\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(CorpusError, match=r"bad\.jsonl:2") as info:
            load_corpus(path, 10)
        assert info.value.path == str(path)


def test_corpus_error_surfaces_from_the_collector(models: dict[str, nn.Module], tmp_path: Path) -> None:
    with pytest.raises(CorpusError):
        _collector(models["gpt2"], bpe_tokenizer(False), tmp_path, corpus=tmp_path / "x.txt").moments([1])
    assert not list(tmp_path.glob("*.safetensors"))


def test_hf_corpus_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails, installed or not
    with pytest.raises(MissingDependencyError, match=r"eamet\[data\]"):
        load_corpus("hf:wikitext:wikitext-103-raw-v1", 10)


def test_hf_corpus_load_failure_is_a_corpus_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")

    def load_dataset(*_a: Any, **_k: Any) -> Any:
        raise ConnectionError("offline")

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(CorpusError, match="offline"):
        load_corpus("hf:wikitext", 10)
