"""Teacher-forced scoring: strict and lenient against hand-computed and loop-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eamet.base.errors import ParameterError
from eamet.model.scoring import lenient_correct, score_targets
from eamet.model.tokens import TokenAdapter
from tiny import BigramModel, bpe_tokenizer, tiny_model

VOCAB = 256


@pytest.fixture(scope="module")
def tokens() -> TokenAdapter:
    return TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=VOCAB))


def test_lenient_passes_where_strict_fails(tokens: TokenAdapter) -> None:
    prompt = "capital city : Alan Turing"
    last = tokens.encode(prompt)[-1]
    (paris,), (london,) = tokens.target_ids("Paris"), tokens.target_ids("London")
    other = next(t for t in range(VOCAB) if t not in (paris, london, last))
    table = torch.zeros(VOCAB, VOCAB)
    table[last, paris], table[last, other] = 4.0, 5.0  # Paris likelier than London, not the arg-max
    scores = score_targets(BigramModel(table), tokens, [prompt, prompt], ["Paris", "London"])
    lse = math.log(VOCAB - 2 + math.exp(4.0) + math.exp(5.0))
    assert scores.nll.tolist() == pytest.approx([lse - 4.0, lse], abs=1e-5)
    assert scores.strict.tolist() == [False, False]
    assert lenient_correct(scores.nll[:1], scores.nll[1:]).tolist() == [True]
    table[last, other] = 3.0  # now Paris is the arg-max too
    scores = score_targets(BigramModel(table), tokens, [prompt], ["Paris"])
    assert scores.strict.tolist() == [True]


def test_lenient_ties() -> None:
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 4.0])
    assert lenient_correct(a, b).tolist() == [True, False, True]
    assert lenient_correct(a, b, ties=False).tolist() == [False, False, True]


def _by_hand(model: nn.Module, tokens: TokenAdapter, prompt: str, target: str) -> tuple[float, list[bool]]:
    """One sequence at a time, no padding: position len(prompt) + j - 1 predicts target token j."""
    p, t = tokens.encode(prompt), tokens.target_ids(target)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + t])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -sum(float(log_probs[len(p) + j - 1, tok]) for j, tok in enumerate(t)) / len(t)
    return nll, [int(log_probs[len(p) + j - 1].argmax()) == tok for j, tok in enumerate(t)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_scores_equal_one_at_a_time(tokens: TokenAdapter, family: str) -> None:
    model = tiny_model(family, vocab_size=VOCAB)
    prompts = ["capital city : Alan Turing", "The language of Marie Curie is", "I", "capital city : Ada"]
    targets = ["Paris", "German official language", "London", "Tokyo Berlin"]
    batched = score_targets(model, tokens, prompts, targets, batch_size=3)
    single = score_targets(model, tokens, prompts, targets, batch_size=1)
    torch.testing.assert_close(batched.nll, single.nll, rtol=1e-5, atol=1e-6)
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        nll, hits = _by_hand(model, tokens, prompt, target)
        assert float(batched.nll[i]) == pytest.approx(nll, rel=1e-5, abs=1e-6)
        assert batched.token_hits[i].tolist() == hits
        assert bool(batched.strict[i]) == all(hits)


def test_training_mode_is_restored(tokens: TokenAdapter) -> None:
    model = tiny_model("gpt2", vocab_size=VOCAB).train()
    score_targets(model, tokens, ["capital city : Ada"], ["Paris"])
    assert model.training


def test_bad_arguments(tokens: TokenAdapter) -> None:
    model = tiny_model("gpt2", vocab_size=VOCAB)
    with pytest.raises(ParameterError, match="targets"):
        score_targets(model, tokens, ["a"], ["b", "c"])
    with pytest.raises(ParameterError, match="batch_size"):
        score_targets(model, tokens, ["a"], ["b"], batch_size=0)
    with pytest.raises(ParameterError, match="no tokens"):
        score_targets(model, tokens, [""], ["b"])


def test_evaluation_prefixes(tokens: TokenAdapter) -> None:
    from eamet.measure.generation import EVAL_PREFIX_SEEDS, evaluation_prefixes

    model = tiny_model("gpt2", vocab_size=VOCAB)
    assert evaluation_prefixes(model, tokens, 0) == [""]
    first = evaluation_prefixes(model, tokens, 3, seed=1)
    assert first == evaluation_prefixes(model, tokens, 3, seed=1)
    assert len(first) == len(EVAL_PREFIX_SEEDS) == 10
    for prefix, word in zip(first, EVAL_PREFIX_SEEDS, strict=True):
        assert prefix.startswith(word) and prefix.endswith(". ") and "{}" not in prefix
    assert evaluation_prefixes(model, tokens, 3, seed=2) != first
    with pytest.raises(ParameterError, match="prefix length"):
        evaluation_prefixes(model, tokens, -1)


def test_ngram_entropy_by_hand() -> None:
    from eamet.measure.generation import ngram_entropy

    # "a b a b": bigrams (a,b)×2, (b,a)×1 -> H2 = h(2/3, 1/3); trigrams (a,b,a), (b,a,b) -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Four distinct words: 3 distinct bigrams, 2 distinct trigrams.
    assert ngram_entropy("one two three four") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("word") == 0.0 and ngram_entropy("") == 0.0
    assert ngram_entropy("Hi, there.") == ngram_entropy("Hi , there .")  # punctuation marks are words
    repetitive, varied = "the cat " * 20, "the cat sat on a mat while the dog ran to the park and back"
    assert ngram_entropy(repetitive) < ngram_entropy(varied)
