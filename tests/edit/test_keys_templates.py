"""Keys and hidden states at the fact token (``eamet.edit.keys``, algorithm.md §3) against a naive per-prompt
computation, and context-template sampling (``eamet.model.templates``, §2): seeding, RNG isolation, text
shape, the sampling filters."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import eamet.edit.keys
from eamet.base.facts import Fact
from eamet.edit.keys import PromptSet, collect, collect_layers
from eamet.model.parts import ModelParts
from eamet.model.templates import BARE_TEMPLATE, generate_templates, template_weights
from eamet.model.tokens import TokenAdapter
from tiny import EOS_ID, bpe_tokenizer, sentencepiece_tokenizer, tiny_model

FACTS = [
    Fact("capital city : {}", "Danielle Darrieux", "Paris"),
    Fact("The mother tongue of {} is", "Marie Curie", "German"),
    Fact("{} lives in the city of", "Paris", "London"),
    Fact("In {}, people speak", "Emma Brown", "Japan"),
    Fact("{} is a citizen of", "Louis", "Berlin"),
]
TEMPLATES = ["{}", "Hello there. {}", "Paris is far away from here. {}", "The. {}"]

# family -> (tokenizer factory, block l's rewrite module); gpt_neo blocks return tuples, gpt2 uses Conv1D.
SETUPS: dict[str, tuple[Callable[[], Any], Callable[[nn.Module, int], nn.Module]]] = {
    "llama": (sentencepiece_tokenizer, lambda m, i: m.model.layers[i].mlp.down_proj),
    "gpt2": (lambda: bpe_tokenizer(False), lambda m, i: m.transformer.h[i].mlp.c_proj),
    "gpt_neo": (lambda: bpe_tokenizer(True), lambda m, i: m.transformer.h[i].mlp.c_proj),
}


@pytest.fixture(scope="module")
def setups() -> dict[str, tuple[nn.Module, TokenAdapter, Callable[[nn.Module, int], nn.Module]]]:
    out = {}
    for family, (make_tok, rewrite) in SETUPS.items():
        model = tiny_model(family, vocab_size=256, n_layer=4, hidden=32, ffn=64)
        out[family] = (model, TokenAdapter(make_tok()), rewrite)
    return out


def _naive(
    model: nn.Module,
    tokens: TokenAdapter,
    rewrite: Callable[[nn.Module, int], nn.Module],
    key_layer: int,
    hidden_layer: int,
    templates: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every templated prompt alone through the whole model; keys weighted ½ bare, ½ shared by the rest."""
    keys = torch.zeros(len(FACTS), 64, dtype=torch.float64)
    hidden = torch.zeros(len(FACTS), 32, dtype=torch.float64)
    captured: list[torch.Tensor] = []
    handle = rewrite(model, key_layer).register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            for i, fact in enumerate(FACTS):
                for t, template in enumerate(templates):
                    enc = tokens.prompt(template.replace("{}", fact.prompt, 1), fact.subject)
                    out = model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True)
                    weight = 1.0 if len(templates) == 1 else (0.5 if t == 0 else 0.5 / (len(templates) - 1))
                    keys[i] += weight * captured.pop()[0, enc.fact_index].double()
                    if t == 0:
                        hidden[i] = out.hidden_states[hidden_layer + 1][0, enc.fact_index].double()
    finally:
        handle.remove()
    return keys, hidden


@pytest.mark.parametrize(("key_layer", "hidden_layer"), [(1, 2), (2, 0)])
@pytest.mark.parametrize("family", sorted(SETUPS))
def test_collect_matches_naive(family: str, key_layer: int, hidden_layer: int, setups: Any) -> None:
    model, tokens, rewrite = setups[family]
    prompts = PromptSet.build(tokens, FACTS, TEMPLATES, "subject_last")
    keys, hidden = collect(
        model, ModelParts(model), tokens, prompts, key_layer=key_layer, hidden_layer=hidden_layer
    )
    assert keys is not None and hidden is not None
    assert keys.dtype == hidden.dtype == torch.float32
    assert keys.shape == (len(FACTS), 64) and hidden.shape == (len(FACTS), 32)
    want_keys, want_hidden = _naive(model, tokens, rewrite, key_layer, hidden_layer, TEMPLATES)
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.double(), want_hidden, rtol=1e-5, atol=1e-5)
    # The template average differs from the bare key (otherwise the weighting would go untested).
    bare_keys, _ = _naive(model, tokens, rewrite, key_layer, hidden_layer, ["{}"])
    assert not torch.allclose(want_keys, bare_keys, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_collect_layers_is_one_collect_per_layer(family: str, setups: Any) -> None:
    """Several blocks' keys from one forward are exactly those of one forward per block."""
    model, tokens, _ = setups[family]
    parts = ModelParts(model)
    prompts = PromptSet.build(tokens, FACTS, TEMPLATES, "subject_last")
    keys, hidden = collect_layers(model, parts, tokens, prompts, key_layers=[0, 2], hidden_layer=1)
    assert sorted(keys) == [0, 2] and hidden is not None
    for layer in (0, 2):
        alone, alone_hidden = collect(model, parts, tokens, prompts, key_layer=layer, hidden_layer=1)
        assert alone is not None and alone_hidden is not None
        assert torch.equal(keys[layer], alone) and torch.equal(hidden, alone_hidden)
    assert not torch.equal(keys[0][:, :8], keys[2][:, :8])
    with pytest.raises(ValueError, match="key layer or a hidden layer"):
        collect_layers(model, parts, tokens, prompts, key_layers=[], hidden_layer=None)


def test_collect_bare_template_only(setups: Any) -> None:
    model, tokens, rewrite = setups["llama"]
    prompts = PromptSet.build(tokens, FACTS, ["{}"], "subject_last")
    assert prompts.weights == [1.0]
    keys, hidden = collect(model, ModelParts(model), tokens, prompts, key_layer=1, hidden_layer=1)
    want_keys, want_hidden = _naive(model, tokens, rewrite, 1, 1, ["{}"])
    assert keys is not None and hidden is not None
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.double(), want_hidden, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batch_size_does_not_matter(family: str, setups: Any) -> None:
    model, tokens, _ = setups[family]
    parts = ModelParts(model)
    prompts = PromptSet.build(tokens, FACTS, TEMPLATES, "subject_last")
    results = [
        collect(model, parts, tokens, prompts, key_layer=2, hidden_layer=1, batch_size=b) for b in (1, 3, 128)
    ]
    for keys, hidden in results[1:]:
        torch.testing.assert_close(keys, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, results[0][1], rtol=1e-5, atol=1e-5)


def test_early_stopping_changes_nothing_and_skips_later_blocks(
    setups: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokens, _ = setups["gpt2"]
    parts = ModelParts(model)
    prompts = PromptSet.build(tokens, FACTS, TEMPLATES, "subject_last")
    later: list[int] = []
    handles = [
        model.transformer.h[2].register_forward_hook(lambda *_: later.append(2)),
        model.lm_head.register_forward_hook(lambda *_: later.append(-1)),
    ]
    try:
        stopped = collect(model, parts, tokens, prompts, key_layer=1, hidden_layer=0, batch_size=4)
        assert later == []  # nothing after block 1 ran
        full_runs: list[int] = []

        def run_to_the_end(m: nn.Module, _stop_after: nn.Module, **inputs: torch.Tensor) -> None:
            full_runs.append(1)
            m(**inputs)

        monkeypatch.setattr(eamet.edit.keys, "run_until", run_to_the_end)
        full = collect(model, parts, tokens, prompts, key_layer=1, hidden_layer=0, batch_size=4)
    finally:
        for handle in handles:
            handle.remove()
    assert full_runs and 2 in later and -1 in later
    for a, b in zip(stopped, full, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_collect_one_side_only(setups: Any) -> None:
    model, tokens, rewrite = setups["llama"]
    parts = ModelParts(model)
    prompts = PromptSet.build(tokens, FACTS, TEMPLATES, "subject_last")
    want_keys, want_hidden = _naive(model, tokens, rewrite, 1, 2, TEMPLATES)
    keys, none = collect(model, parts, tokens, prompts, key_layer=1, hidden_layer=None)
    assert none is None and keys is not None
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-5, atol=1e-5)
    rows: list[int] = []
    handle = model.model.embed_tokens.register_forward_hook(lambda _m, a, _o: rows.append(a[0].shape[0]))
    try:
        none, hidden = collect(model, parts, tokens, prompts, key_layer=None, hidden_layer=2)
    finally:
        handle.remove()
    assert none is None and hidden is not None
    assert sum(rows) == len(FACTS)  # only the bare prompts are run for hidden states alone
    torch.testing.assert_close(hidden.double(), want_hidden, rtol=1e-5, atol=1e-5)


def test_prompt_set_build(setups: Any) -> None:
    _, tokens, _ = setups["gpt2"]
    prompts = PromptSet.build(tokens, FACTS, TEMPLATES, "subject_last")
    assert len(prompts.encoded) == len(FACTS) and all(len(row) == len(TEMPLATES) for row in prompts.encoded)
    assert prompts.weights == template_weights(TEMPLATES)
    for fact, row in zip(FACTS, prompts.encoded, strict=True):
        bare = row[0]
        assert bare.ids == tokens.encode(fact.text)
        # The fact token is the subject's last token: decoding up to it ends with the subject.
        text = tokens.tokenizer.decode(bare.ids[: bare.fact_index + 1])
        assert text.endswith(fact.subject)
        for template, enc in zip(TEMPLATES[1:], row[1:], strict=True):
            assert enc.ids == tokens.encode(template.replace("{}", fact.text))


# -- templates --------------------------------------------------------------------------------------------

SEEDS = ["The", "Paris", "I", "You"]


@pytest.fixture(scope="module")
def lm() -> tuple[nn.Module, TokenAdapter]:
    return tiny_model("gpt2", vocab_size=256, n_layer=2, hidden=32, ffn=64), TokenAdapter(
        bpe_tokenizer(False)
    )


def test_templates_are_seeded_and_shaped(lm: tuple[nn.Module, TokenAdapter]) -> None:
    model, tokens = lm
    a = generate_templates(model, tokens, SEEDS, length=6, seed=3)
    b = generate_templates(model, tokens, SEEDS, length=6, seed=3)
    c = generate_templates(model, tokens, SEEDS, length=6, seed=4)
    assert a == b
    assert a != c
    for templates in (a, c):
        assert templates[0] == BARE_TEMPLATE == "{}"
        assert len(templates) == len(SEEDS) + 1
        for word, template in zip(SEEDS, templates[1:], strict=True):
            assert template.startswith(word) and template.endswith(". {}")
            assert template.count("{}") == 1
            assert len(template) > len(word) + len(". {}")  # something was sampled


class _NoCache(nn.Module):
    """The same model behind a forward that takes no KV cache: templates take the uncached loop."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_templates_with_the_kv_cache_are_those_without(family: str) -> None:
    model = tiny_model(family, vocab_size=256, n_layer=2, hidden=32, ffn=64).eval()
    tokens = TokenAdapter(bpe_tokenizer(False))
    for seed in (0, 1, 2):
        cached = generate_templates(model, tokens, SEEDS, length=12, seed=seed)
        assert cached == generate_templates(_NoCache(model), tokens, SEEDS, length=12, seed=seed)


def test_templates_leave_the_global_rng_alone(lm: tuple[nn.Module, TokenAdapter]) -> None:
    model, tokens = lm
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = generate_templates(model, tokens, SEEDS, length=4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    generate_templates(model, tokens, SEEDS, length=4, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    # And the global RNG does not drive the sampling.
    torch.manual_seed(999)
    assert generate_templates(model, tokens, SEEDS, length=4, seed=0) == first


def test_unseeded_templates_vary(lm: tuple[nn.Module, TokenAdapter]) -> None:
    model, tokens = lm
    runs = {tuple(generate_templates(model, tokens, SEEDS, length=8, seed=None)) for _ in range(3)}
    assert len(runs) > 1


@pytest.mark.parametrize("make_tok", [lambda: bpe_tokenizer(True), sentencepiece_tokenizer])
def test_templates_with_bos_tokenizers(make_tok: Callable[[], Any]) -> None:
    model = tiny_model("llama", vocab_size=256, n_layer=2, hidden=32, ffn=64)
    tokens = TokenAdapter(make_tok())
    templates = generate_templates(model, tokens, SEEDS, length=5, seed=0)
    for word, template in zip(SEEDS, templates[1:], strict=True):
        assert template.startswith(word) and template.endswith(". {}") and "<s>" not in template


def test_no_templates_for_zero_length_or_no_seeds(lm: tuple[nn.Module, TokenAdapter]) -> None:
    model, tokens = lm
    assert generate_templates(model, tokens, SEEDS, length=0) == ["{}"]
    assert generate_templates(model, tokens, [], length=5) == ["{}"]


class _FixedLogits(nn.Module):
    """A stand-in LM whose next-token logits are always ``logits``; counts its calls."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.next_logits = logits
        self.calls = 0
        self.last_input = torch.zeros(0)

    def forward(self, input_ids: torch.Tensor) -> Any:
        self.calls += 1
        self.last_input = input_ids
        logits = self.next_logits.expand(*input_ids.shape, -1)
        return SimpleNamespace(logits=logits)


def _favouring(vocab: int, favoured: dict[int, float]) -> torch.Tensor:
    logits = torch.zeros(vocab)
    for token, value in favoured.items():
        logits[token] = value
    return logits


def test_braces_are_removed_from_generated_text() -> None:
    tok = bpe_tokenizer(False)
    tokens = TokenAdapter(tok)
    brace_open, brace_close = tok.convert_tokens_to_ids(["{", "}"])
    model = _FixedLogits(_favouring(256, {brace_open: 50.0, brace_close: 50.0}))
    templates = generate_templates(model, tokens, ["The", "I"], length=6, seed=0)
    assert len(templates) == 3
    for word, template in zip(["The", "I"], templates[1:], strict=True):
        body = template[: -len(". {}")]
        assert "{" not in body and "}" not in body
        assert body == word + " " * 6  # six sampled braces, each replaced by a space
    assert model.calls == 12


def test_sampling_stops_at_eos() -> None:
    tokens = TokenAdapter(bpe_tokenizer(False))
    model = _FixedLogits(_favouring(256, {EOS_ID: 50.0}))
    assert generate_templates(model, tokens, ["The", "Paris"], length=10, seed=0) == [
        "{}",
        "The. {}",
        "Paris. {}",
    ]
    assert model.calls == 2  # one sampled token (EOS) per seed word


def test_top_k_one_is_greedy() -> None:
    tok = bpe_tokenizer(False)
    tokens = TokenAdapter(tok)
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0))
    model = _FixedLogits(logits)
    best = tok.decode([int(logits.argmax())])
    for seed in range(3):
        templates = generate_templates(model, tokens, ["The"], length=3, top_k=1, seed=seed)
        assert templates[1] == "The" + best * 3 + ". {}"
        # A tiny nucleus keeps only the most likely token too.
        templates = generate_templates(model, tokens, ["The"], length=3, top_p=1e-6, seed=seed)
        assert templates[1] == "The" + best * 3 + ". {}"


def test_sampled_tokens_stay_inside_transformers_filters() -> None:
    # Temperature, then top-k, then top-p, as transformers orders its logits warpers.
    tok = bpe_tokenizer(False)
    tokens = TokenAdapter(tok)
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1)) * 2
    logits[EOS_ID] = -1e4  # never stop early
    temperature, top_k, top_p = 0.7, 20, 0.8
    scores = logits[None].clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(torch.zeros(1, 1, dtype=torch.long), scores)
    allowed = set(torch.nonzero(torch.isfinite(scores[0])).flatten().tolist())
    assert 1 < len(allowed) < top_k
    model = _FixedLogits(logits)
    generate_templates(
        model, tokens, ["The"], length=200, temperature=temperature, top_k=top_k, top_p=top_p, seed=5
    )
    assert model.calls == 200
    # The last forward saw the seed word and the first 199 sampled tokens.
    seen = model.last_input[0, len(tokens.encode("The")) :].tolist()
    assert len(seen) == 199
    assert set(seen) <= allowed
    assert len(set(seen)) >= len(allowed) - 1  # and (nearly) all of them get drawn


def test_template_weights() -> None:
    assert template_weights(["{}"]) == [1.0]
    assert template_weights(["{}", "a. {}"]) == [0.5, 0.5]
    weights = template_weights(["{}", "a. {}", "b. {}", "c. {}", "d. {}"])
    assert weights == [0.5, 0.125, 0.125, 0.125, 0.125]
    assert sum(template_weights(["{}"] + ["x. {}"] * 9)) == pytest.approx(1.0)
