"""corpus="model:<n>": C from text sampled from the model itself — seeded, cached with its provenance,
never re-sampled when the texts or the statistics are already cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from eamet import model_corpus
from eamet.covariance import CovarianceCollector, load_corpus
from eamet.errors import CorpusError
from eamet.parts import ModelParts
from eamet.tokens import TokenAdapter
from tiny import bpe_tokenizer, tiny_model


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of documents of every sampling run (the slow part)."""
    calls: list[int] = []
    real = model_corpus._generate

    def generate(model: Any, tokens: Any, n: int, **kwargs: Any) -> list[str]:
        calls.append(n)
        return real(model, tokens, n, **kwargs)

    monkeypatch.setattr(model_corpus, "_generate", generate)
    monkeypatch.setattr(model_corpus, "DOCUMENT_TOKENS", 6)  # short documents: a fast test
    return calls


def collector(model: Any, tokens: TokenAdapter, root: Path, corpus: str = "model:10") -> CovarianceCollector:
    return CovarianceCollector(
        model, ModelParts(model), tokens, corpus=corpus, n_samples=100, max_length=32, cache_dir=root,
        progress=False,
    )  # fmt: skip


def test_sampled_texts_are_seeded_cached_and_reused(tmp_path: Path, counted: list[int]) -> None:
    model = tiny_model("llama", vocab_size=256)
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=256))
    state = torch.get_rng_state()
    first = collector(model, tokens, tmp_path).texts()
    assert torch.equal(torch.get_rng_state(), state), "sampling moved the caller's RNG"
    assert len(first) == 10 and len(set(first)) > 1 and counted == [10]
    assert all(any(t.startswith(o) for o in model_corpus.OPENINGS) for t in first)
    # Same model, same settings: read back, not sampled again; and identical when sampled afresh.
    assert collector(model, tokens, tmp_path).texts() == first and counted == [10]
    assert collector(model, tokens, tmp_path / "elsewhere").texts() == first and counted == [10, 10]
    # A changed weight is another model: other texts.
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    assert collector(model, tokens, tmp_path).texts() != first and counted == [10, 10, 10]


def test_statistics_of_a_sampled_corpus_are_found_without_sampling(
    tmp_path: Path, counted: list[int]
) -> None:
    model = tiny_model("llama", vocab_size=256)
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=256))
    moments = collector(model, tokens, tmp_path).moments([0, 1])
    assert counted == [10] and moments[0].metadata["corpus"].startswith("model:10:sha256:")
    entries = list((tmp_path / "corpora").iterdir())
    assert len(entries) == 1
    for entry in entries:  # drop the texts: the cached statistics must still be found
        for path in entry.iterdir():
            path.unlink()
        entry.rmdir()
    again = collector(model, tokens, tmp_path).moments([0, 1])
    assert counted == [10]
    assert torch.equal(torch.from_numpy(again[1].moment()), torch.from_numpy(moments[1].moment()))


def test_a_damaged_corpus_entry_is_sampled_again(tmp_path: Path, counted: list[int]) -> None:
    model = tiny_model("gpt2", vocab_size=256)
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=256))
    first = collector(model, tokens, tmp_path, "model:4").texts()
    (entry,) = (tmp_path / "corpora").iterdir()
    texts = entry / "texts.jsonl"
    texts.write_text(json.dumps("forged") + "\n" + texts.read_text().split("\n", 1)[1])
    assert collector(model, tokens, tmp_path, "model:4").texts() == first and counted == [4, 4]


@pytest.mark.parametrize("corpus", ["model:", "model:x", "model:0", "model:-3"])
def test_malformed_model_corpora(corpus: str, tmp_path: Path) -> None:
    model = tiny_model("llama", vocab_size=256)
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=256))
    with pytest.raises(CorpusError, match="model:<n>"):
        collector(model, tokens, tmp_path, corpus)


def test_load_corpus_refuses_a_model_corpus() -> None:
    with pytest.raises(CorpusError, match="sampled from a model"):
        load_corpus("model:5", 10)
