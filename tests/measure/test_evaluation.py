"""eamet.evaluate: every metric against an independent one-prompt-at-a-time computation, prefixes where the
protocol puts them, strict vs lenient, zsRE's token-level specificity, fluency, determinism."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

import eamet
import eamet.measure.evaluation as evaluation
from eamet.base.errors import FactError, ParameterError
from eamet.base.facts import Fact
from eamet.base.records import EditCase, zsre_case
from eamet.measure.evaluation import EvaluationReport, evaluate
from eamet.measure.generation import evaluation_prefixes, ngram_entropy
from eamet.model.tokens import TokenAdapter
from tiny import BigramModel, bpe_tokenizer, tiny_model

VOCAB = 256
PREFIXES = ["The capital. ", "In Rome, people speak Italian. "]


@pytest.fixture(scope="module")
def tokens() -> TokenAdapter:
    return TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=VOCAB))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model("gpt2", vocab_size=VOCAB)


def cases() -> list[EditCase]:
    return [
        EditCase(
            3,
            Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
            paraphrases=("Danielle Darrieux speaks", "In Paris, Danielle Darrieux speaks"),
            # the random model repeats the prompt's last word: "speaks" is its arg-max (strict 1)
            neighborhood=(
                ("The mother tongue of Marie Curie is", "French"),
                ("Pierre Martin speaks", "speaks"),
            ),
            generation_prompts=("Danielle Darrieux lives in", "The capital city of France is"),
        ),
        # no paraphrases or neighbours; "of" is the arg-max after the bare prompt
        EditCase(4, Fact("{} is the capital of", "Berlin", "of", "Germany")),
        zsre_case(
            {
                "subject": "Anna Smith",
                "src": "Which city did Anna Smith live in?",
                "answers": ["Lisbon"],
                "rephrase": "Where did Anna Smith live?",
                "loc": "nq question: who is the capital of Spain",
                "loc_ans": "Madrid city Spanish",
            },
            5,
        ),
    ]


def by_hand(model: nn.Module, tokens: TokenAdapter, prompt: str, target: str) -> tuple[float, list[bool]]:
    """One sequence, no padding, no batching: position len(prompt) + j - 1 predicts target token j."""
    p, t = tokens.encode(prompt), tokens.target_ids(target)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].double(), dim=-1)
    nll = -sum(float(log_probs[len(p) + j - 1, tok]) for j, tok in enumerate(t)) / len(t)
    return nll, [int(log_probs[len(p) + j - 1].argmax()) == tok for j, tok in enumerate(t)]


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def expected_record(
    model: nn.Module, tokens: TokenAdapter, case: EditCase, prefixes: list[str]
) -> dict[str, Any]:
    """algorithm.md §8.2 written out prompt by prompt."""
    new, true = case.rewrite.target, case.rewrite.target_true
    cf = case.kind == "counterfact"
    before = prefixes if cf else [""]
    out: dict[str, Any] = {"case_id": case.case_id, "kind": case.kind}
    for metric, prompts in (
        ("efficacy", [p + case.rewrite.text for p in before]),
        ("generalization", list(case.paraphrases)),
    ):
        strict, lenient = [], []
        for prompt in prompts:
            nll_new, hits = by_hand(model, tokens, prompt, new)
            strict.append(float(all(hits)))
            if cf and true is not None:
                lenient.append(float(nll_new <= by_hand(model, tokens, prompt, true)[0]))
        out[f"{metric}_strict"], out[f"{metric}_lenient"] = mean(strict), mean(lenient)
    strict, lenient = [], []
    for p in before:
        for prompt, expected in case.neighborhood:
            nll_expected, hits = by_hand(model, tokens, p + prompt, expected)
            if cf:
                strict.append(float(all(hits)))
                lenient.append(float(nll_expected < by_hand(model, tokens, p + prompt, new)[0]))
            else:
                strict.extend(float(h) for h in hits)  # zsRE: token by token
    out["specificity_strict"], out["specificity_lenient"] = mean(strict), mean(lenient)
    return out


def assert_rows_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want) | {"fluency"}
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-9), key
        else:
            assert got[key] == value, key


def test_every_metric_matches_a_prompt_by_prompt_computation(model: nn.Module, tokens: TokenAdapter) -> None:
    report = evaluate(model, tokens, cases(), prefixes=PREFIXES, fluency=False, batch_size=3, progress=False)
    assert report.prefixes == tuple(PREFIXES)
    for got, case in zip(report.per_record, cases(), strict=True):
        assert_rows_close(got, expected_record(model, tokens, case, PREFIXES))
        assert got["fluency"] is None
    rows = report.per_record
    assert 0 < rows[0]["specificity_strict"] < 1 and rows[1]["efficacy_strict"] > 0  # not all-or-nothing
    assert rows[1]["generalization_strict"] is None and rows[1]["specificity_lenient"] is None
    assert rows[2]["efficacy_lenient"] is None and rows[2]["specificity_lenient"] is None
    summary = report.summary
    for metric in ("efficacy", "generalization", "specificity"):
        for how in ("strict", "lenient"):
            values = [r[f"{metric}_{how}"] for r in rows if r[f"{metric}_{how}"] is not None]
            assert summary[metric][how] == pytest.approx(sum(values) / len(values))
    assert (summary["fluency"], summary["n_records"], summary["prefix_len"]) == (None, 3, 0)
    # generated prefixes: the same as evaluation_prefixes of the model with the seed
    generated = evaluate(model, tokens, cases()[:2], prefix_len=2, seed=4, fluency=False, progress=False)
    mine = evaluation_prefixes(model, tokens, 2, seed=4)
    assert list(generated.prefixes) == mine and len(mine) == 10
    for got, case in zip(generated.per_record, cases()[:2], strict=True):
        assert_rows_close(got, expected_record(model, tokens, case, mine))


def test_strict_and_lenient_side_by_side(tokens: TokenAdapter) -> None:
    """A hand-built model: the new object is likelier than the true one after the rewrite prompt but not
    the arg-max (lenient yes, strict no); the paraphrase fails both; the neighbour keeps its object."""
    rewrite, paraphrase, neighbour = "capital city : Alan Turing", "Turing lives in", "Paris is"
    last = {
        name: tokens.encode(text)[-1] for name, text in [("r", rewrite), ("p", paraphrase), ("n", neighbour)]
    }
    assert len(set(last.values())) == 3
    (tokyo,), (london,) = tokens.target_ids("Tokyo"), tokens.target_ids("London")
    other = next(t for t in range(VOCAB) if t not in (tokyo, london, *last.values()))
    table = torch.zeros(VOCAB, VOCAB)
    table[last["r"], tokyo], table[last["r"], other] = 4.0, 5.0
    table[last["p"], london] = 3.0
    table[last["n"], london] = 3.0
    case = EditCase(
        0,
        Fact("capital city : {}", "Alan Turing", "Tokyo", "London"),
        (paraphrase,),
        ((neighbour, "London"),),
    )
    report = evaluate(BigramModel(table), tokens, [case], fluency=False, progress=False)
    assert report.metrics() == {
        "efficacy_strict": 0.0,
        "efficacy_lenient": 1.0,
        "generalization_strict": 0.0,
        "generalization_lenient": 0.0,
        "specificity_strict": 1.0,
        "specificity_lenient": 1.0,
        "fluency": None,
    }
    table[last["r"], other] = 3.0  # now the new object is the arg-max too
    table[last["n"], tokyo] = 3.0  # a tie between the neighbour's object and the new one: lenient fails
    report = evaluate(BigramModel(table), tokens, [case], fluency=False, progress=False)
    assert report.summary["efficacy"] == {"strict": 1.0, "lenient": 1.0}
    assert report.summary["specificity"]["lenient"] == 0.0


def test_zsre_specificity_is_token_level(tokens: TokenAdapter) -> None:
    """A three-token answer of which the model predicts the first and third token: 2/3, where an all-token
    match would give 0; no lenient number for zsRE."""
    answer_ids = tokens.target_ids("Madrid Tokyo Paris")
    assert len(answer_ids) == 3
    loc = "capital city : Rome"
    seq = tokens.encode(loc + "?") + answer_ids
    table = torch.zeros(VOCAB, VOCAB)
    table[seq[-4], answer_ids[0]] = 5.0  # hit
    table[seq[-3], (answer_ids[1] + 1) % VOCAB] = 5.0  # miss
    table[seq[-2], answer_ids[2]] = 5.0  # hit
    record = {
        "subject": "Ada",
        "src": "Where was Ada born?",
        "answers": ["Paris"],
        "loc": loc,
        "loc_ans": "Madrid Tokyo Paris",
    }
    report = evaluate(BigramModel(table), tokens, [record], fluency=False, progress=False)
    (row,) = report.per_record
    assert row["kind"] == "zsre" and row["specificity_strict"] == pytest.approx(2 / 3)
    assert row["efficacy_lenient"] is None and row["generalization_strict"] is None
    summary = report.summary
    assert summary["efficacy"]["lenient"] is None and summary["specificity"]["lenient"] is None


def test_prefixes_only_where_the_protocol_puts_them(
    model: nn.Module, tokens: TokenAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[str], list[str]]] = []
    real = evaluation.score_targets

    def spy(
        model: nn.Module, tokens: TokenAdapter, prompts: Sequence[str], targets: Sequence[str], **kw: Any
    ) -> Any:
        calls.append((list(prompts), list(targets)))
        return real(model, tokens, prompts, targets, **kw)

    monkeypatch.setattr(evaluation, "score_targets", spy)
    cf, _, zs = cases()
    evaluate(model, tokens, [cf, zs], prefixes=PREFIXES, fluency=False, progress=False)
    assert len(calls) == 3  # one batched call per metric: efficacy, generalization, specificity
    (eff_p, eff_t), (gen_p, gen_t), (spe_p, spe_t) = calls
    assert eff_p == [p + cf.rewrite.text for p in PREFIXES for _ in "nt"] + [zs.rewrite.text]
    assert eff_t == ["English", "French"] * 2 + ["Lisbon"]
    assert gen_p == [q for q in cf.paraphrases for _ in "nt"] + list(zs.paraphrases)
    assert gen_t == ["English", "French"] * 2 + ["Lisbon"]
    assert spe_p == [p + q for p in PREFIXES for q, _ in cf.neighborhood for _ in "eo"] + [
        zs.neighborhood[0][0]
    ]
    assert spe_t == ["French", "English", "speaks", "English"] * 2 + ["Madrid city Spanish"]


def test_fluency_aggregates_entropy_per_record(
    model: nn.Module, tokens: TokenAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = {
        "Danielle Darrieux lives in": "the cat " * 20,
        "The capital city of France is": "the cat sat on a mat while the dog ran to the park",
        "Berlin is the capital of": "Berlin is the capital of of of of of of",
    }
    seen: list[list[str]] = []

    def fake(model: nn.Module, tokens: TokenAdapter, prompts: Sequence[str], **kw: Any) -> list[str]:
        seen.append(list(prompts))
        return [texts.get(p, p) for p in prompts]

    monkeypatch.setattr(evaluation, "greedy_texts", fake)
    cf, bare, zs = cases()
    report = evaluate(model, tokens, [cf, bare, zs], prefixes=[""], progress=False)
    assert seen == [[*cf.generation_prompts, bare.rewrite.text, zs.rewrite.text]]
    rows = report.per_record
    repetitive, varied = ngram_entropy("the cat " * 20), ngram_entropy(texts["The capital city of France is"])
    assert repetitive < varied
    assert rows[0]["fluency"] == pytest.approx((repetitive + varied) / 2)
    assert rows[1]["fluency"] == pytest.approx(ngram_entropy(texts["Berlin is the capital of"]))
    assert rows[2]["fluency"] == pytest.approx(ngram_entropy(zs.rewrite.text))
    assert report.summary["fluency"] == pytest.approx(sum(r["fluency"] for r in rows) / 3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_matches_a_loop_one_prompt_at_a_time(tokens: TokenAdapter, family: str) -> None:
    model = tiny_model(family, vocab_size=VOCAB)
    prompts = ["The mother tongue of", "Paris is", "capital city : Danielle Darrieux", "Rome is"]
    via_generate = evaluation.greedy_texts(
        model, tokens, prompts, new_tokens=5, batch_size=2, use_generate=True
    )
    via_loop = evaluation.greedy_texts(model, tokens, prompts, new_tokens=5, batch_size=3, use_generate=False)
    assert via_generate == via_loop
    for prompt, text in zip(prompts, via_generate, strict=True):
        ids = tokens.encode(prompt)
        with torch.no_grad():
            for _ in range(5):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        eos = tokens.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        assert text == tokens.tokenizer.decode(ids, skip_special_tokens=True)
        assert text.startswith(prompt)


def test_report_is_deterministic_and_json_ready(model: nn.Module, tokens: TokenAdapter) -> None:
    def run(seed: int) -> EvaluationReport:
        return evaluate(
            model, tokens.tokenizer, cases(), prefix_len=2, seed=seed, generation_tokens=4, progress=False
        )

    first = run(0)
    assert run(0).to_dict() == first.to_dict()
    assert run(1).prefixes != first.prefixes
    data = json.loads(json.dumps(first.to_dict()))
    assert data["summary"] == first.summary and data["prefixes"] == list(first.prefixes)
    assert [r["case_id"] for r in data["per_record"]] == [3, 4, 5]
    assert set(first.metrics()) == {
        "efficacy_strict",
        "efficacy_lenient",
        "generalization_strict",
        "generalization_lenient",
        "specificity_strict",
        "specificity_lenient",
        "fluency",
    }
    assert isinstance(first.summary["fluency"], float)
    assert first.summary["prefix_len"] == 2 and first.summary["n_records"] == 3


def test_mode_is_restored_and_lazy_exports(tokens: TokenAdapter) -> None:
    model = tiny_model("gpt2", vocab_size=VOCAB).train()
    evaluate(model, tokens, cases()[:1], fluency=False, progress=True)
    assert model.training
    assert eamet.evaluate is evaluate and eamet.EvaluationReport is EvaluationReport


def test_bad_arguments(model: nn.Module, tokens: TokenAdapter) -> None:
    good = cases()[:1]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"prefix_len": -1}, "prefix_len"),
        ({"prefixes": []}, "prefixes"),
        ({"prefixes": "The "}, "prefixes"),
        ({"batch_size": 0}, "batch_size"),
        ({"generation_tokens": 0}, "generation_tokens"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ParameterError, match=match):
            evaluate(model, tokens, good, progress=False, **kwargs)
    with pytest.raises(ParameterError, match="no records"):
        evaluate(model, tokens, [], progress=False)
    with pytest.raises(ParameterError, match="record 1"):
        evaluate(model, tokens, [good[0], 3], progress=False)  # type: ignore[list-item]
    with pytest.raises(FactError, match="record 1") as info:
        evaluate(
            model, tokens, [good[0], {"prompt": "no slot", "subject": "X", "target": "y"}], progress=False
        )
    assert info.value.row == 1
