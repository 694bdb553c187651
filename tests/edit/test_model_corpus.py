"""corpus="model:<n>": C from text sampled from the model itself — seeded, cached with its provenance,
never re-sampled when the texts or the statistics are already cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from eamet.base.errors import CorpusError
from eamet.edit import model_corpus
from eamet.edit.corpus import load_corpus
from eamet.edit.moment_collector import SecondMomentCollector
from eamet.model.parts import ModelParts
from eamet.model.tokens import TokenAdapter
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


def collector(
    model: Any, tokens: TokenAdapter, root: Path, corpus: str = "model:10"
) -> SecondMomentCollector:
    return SecondMomentCollector(
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
    openings = model_corpus.OPENINGS
    assert all(text.startswith(openings[d % len(openings)]) for d, text in enumerate(first))
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


@pytest.mark.parametrize("spread", [0.5, 3.0, 30.0])  # peaked rows need k = 64; flat ones the full sort
def test_nucleus_is_transformers_top_p(spread: float) -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator().manual_seed(int(spread * 10))
    logits = torch.randn(6, 5000, generator=gen) * spread
    weights, index = model_corpus.nucleus(logits, 1.0, 0.95)
    warped = TopPLogitsWarper(0.95)(None, logits.clone())  # type: ignore[arg-type]
    probs = logits.softmax(-1)
    for row in range(logits.shape[0]):
        ours = set(index[row][weights[row] > 0].tolist())
        assert ours == set(torch.nonzero(torch.isfinite(warped[row])).flatten().tolist())
        kept = index[row][weights[row] > 0]
        torch.testing.assert_close(weights[row][weights[row] > 0], probs[row][kept])


def test_sample_nucleus_draws_only_from_the_nucleus_in_proportion() -> None:
    logits = torch.tensor([[4.0, 3.0, 0.0, -9.0], [0.0, 0.0, 0.0, 0.0]]).log_softmax(-1)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([model_corpus.sample_nucleus(logits, 1.0, 0.9, gen) for _ in range(4000)])
    assert set(draws[:, 0].tolist()) == {0, 1}  # 0.71 + 0.26 reaches 0.9: tokens 2 and 3 are outside
    share = (draws[:, 0] == 0).float().mean().item()
    assert abs(share - 0.731) < 0.03  # e^4 / (e^4 + e^3) of the kept mass
    assert set(draws[:, 1].tolist()) == {0, 1, 2, 3}  # flat: the nucleus is every token


def test_documents_stop_at_eos_and_progress_reaches_every_document(
    tmp_path: Path, counted: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llama", vocab_size=256)
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=256))
    eos = tokens.tokenizer.eos_token_id
    assert eos is not None

    def eos_only(module: Any, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.arange(logits.shape[-1]) == eos, 50.0, 0.0).expand_as(logits)

    model.lm_head.register_forward_hook(eos_only)  # every document ends at its first token
    steps: list[float] = []
    real = model_corpus._continue

    def counting(*args: Any) -> torch.Tensor:
        on_steps = args[-1]
        return real(*args[:-1], lambda k: (steps.append(k), on_steps(k)))

    monkeypatch.setattr(model_corpus, "_continue", counting)
    texts = model_corpus.sample_texts(model, tokens, 3, model_fingerprint="x", root=tmp_path, progress=False)
    assert len(texts) == 3 and all(t in model_corpus.OPENINGS for t in texts)
    assert sum(steps) == model_corpus.DOCUMENT_TOKENS and len(steps) < model_corpus.DOCUMENT_TOKENS


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_cached_sampler_draws_what_a_cache_free_loop_draws(arch: str) -> None:
    model = tiny_model(arch, vocab_size=256).eval()
    openings = torch.tensor([[5, 9], [7, 3], [11, 2]])
    steps = 12
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_corpus, "DOCUMENT_TOKENS", steps)
        cached = model_corpus._continue(
            model, openings, torch.Generator().manual_seed(3), None, lambda k: None
        )
    generator = torch.Generator().manual_seed(3)
    ids = openings
    with torch.no_grad():
        for _ in range(steps):  # the whole sequence again at every token
            logits = model(input_ids=ids).logits[:, -1, :]
            nxt = model_corpus.sample_nucleus(logits, 1.0, model_corpus.SAMPLING["top_p"], generator)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(cached, ids[:, openings.shape[1] :])


def test_sampling_says_what_why_and_where_before_its_bar(
    tmp_path: Path, counted: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model("llama", vocab_size=256)
    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=256))
    model_corpus.sample_texts(model, tokens, 3, model_fingerprint="x", root=tmp_path, progress=True)
    err = capsys.readouterr().err
    (entry,) = tmp_path.iterdir()
    note = err.splitlines()[0]
    assert "'model:3'" in note and "3 documents" in note and str(entry) in note
    assert "3/3 docs" in err  # the bar reached every document
    model_corpus.sample_texts(model, tokens, 3, model_fingerprint="x", root=tmp_path, progress=True)
    assert capsys.readouterr().err == "" and counted == [3]  # cached: nothing sampled, nothing said


def test_a_model_without_a_kv_cache_is_a_corpus_error(tmp_path: Path) -> None:
    class NoCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_model("llama", vocab_size=256)

        def forward(self, input_ids: torch.Tensor) -> Any:
            return self.model(input_ids=input_ids)

    tokens = TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=256))
    with pytest.raises(CorpusError, match="KV cache"):
        model_corpus.sample_texts(NoCache(), tokens, 2, model_fingerprint="x", root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [] or all(not any(p.iterdir()) for p in tmp_path.iterdir())
