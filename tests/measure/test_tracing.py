"""eamet.trace (causal tracing, ROME) and eamet.known_cases: on the shipped pocket model, which knows its
world and reads facts at the subject's last token, and on tiny random models (shapes, an independent
computation, determinism, batching, hooks, layouts, errors)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import eamet
from eamet.app.cli import main
from eamet.base.errors import FactError, MissingDependencyError, ParameterError
from eamet.base.facts import Fact
from eamet.base.records import EditCase
from eamet.measure.known import known_cases
from eamet.measure.tracing import NOISE_STD_FACTOR, TraceReport, _record_noise, trace
from eamet.model.parts import ModelParts
from eamet.model.scoring import score_targets
from eamet.model.tokens import TokenAdapter
from eamet.sandbox import default_world, pocket_model
from eamet.sandbox.pocket import shipped_model_dir
from tiny import bpe_tokenizer, tiny_model

VOCAB = 256
SUBJECTS = ["Marie Curie", "Danielle Darrieux", "John Smith", "Anna Moreau"]
TRUE = ["French", "Paris", "English", "Rome"]


@pytest.fixture(scope="module")
def pocket() -> tuple[nn.Module, Any, list[EditCase]]:
    model, tokenizer = pocket_model(progress=False)
    return model, tokenizer, default_world().cases[:32]


@pytest.fixture(scope="module")
def tokens() -> TokenAdapter:
    return TokenAdapter(bpe_tokenizer(add_bos=False, vocab_size=VOCAB))


def tiny_cases(template: str = "capital city : {}") -> list[EditCase]:
    return [
        EditCase(i, Fact(template, s, "Tokyo", t, i))
        for i, (s, t) in enumerate(zip(SUBJECTS, TRUE, strict=True))
    ]


@contextmanager
def no_hooks_left(model: nn.Module) -> Iterator[None]:
    yield
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


# -- known facts -----------------------------------------------------------------------------------------


def test_known_cases_keeps_the_facts_the_pocket_model_knows_and_drops_false_ones(
    pocket: tuple[nn.Module, Any, list[EditCase]],
) -> None:
    model, tokenizer, cases = pocket
    # The same prompts with the new object posing as the true one: the unedited model does not give it.
    false = [
        EditCase(1000 + c.case_id, Fact(c.rewrite.prompt, c.rewrite.subject, "x", c.rewrite.target, None))
        for c in cases
    ]
    mixed = [c for pair in zip(cases, false, strict=True) for c in pair]
    known = known_cases(model, tokenizer, mixed)
    assert {c.case_id for c in known} <= {c.case_id for c in cases}
    assert len(known) >= 0.9 * len(cases)
    # An independent check of the verdicts: greedy decoding of the true object's tokens, one at a time (of
    # the shipped model's first 32 facts, case 30 fails it).
    adapter = TokenAdapter(tokenizer)
    kept = {c.case_id for c in known}
    for case in [*cases, *false[:8]]:
        ids = adapter.encode(case.rewrite.text)
        greedy = True
        for token in adapter.target_ids(str(case.rewrite.target_true)):
            with torch.no_grad():
                greedy &= int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids.append(token)
        assert (case.case_id in kept) == greedy, case
    # limit: the first `limit` known cases, in input order.
    assert [c.case_id for c in known_cases(model, tokenizer, mixed, limit=5)] == [
        c.case_id for c in known[:5]
    ]


def test_known_cases_with_prefixes_requires_every_prefix(
    pocket: tuple[nn.Module, Any, list[EditCase]],
) -> None:
    model, tokenizer, cases = pocket
    bare = {c.case_id for c in known_cases(model, tokenizer, cases)}
    distracting = "Paris Paris Paris London Berlin. "  # costs the model a few of its facts
    both = {c.case_id for c in known_cases(model, tokenizer, cases, prefixes=["", distracting])}
    scores = score_targets(
        model,
        TokenAdapter(tokenizer),
        [distracting + c.rewrite.text for c in cases],
        [str(c.rewrite.target_true) for c in cases],
    )
    after_prefix = {c.case_id for c, ok in zip(cases, scores.strict.tolist(), strict=True) if ok}
    assert both == bare & after_prefix
    assert len(both) < len(bare)


def test_known_cases_rejects_records_without_a_true_object(tokens: TokenAdapter) -> None:
    model = tiny_model("gpt2", vocab_size=VOCAB)
    zsre = eamet.base.records.zsre_case(
        {"src": "What is the capital of France?", "subject": "France", "answers": ["Paris"]}, 0
    )
    with pytest.raises(FactError, match=r"record 1 \(case 0\): has no true object") as exc:
        known_cases(model, tokens, [*tiny_cases()[:1], zsre])
    assert exc.value.row == 1
    with pytest.raises(ParameterError, match="no records to check"):
        known_cases(model, tokens, [])
    with pytest.raises(ParameterError, match="limit"):
        known_cases(model, tokens, tiny_cases(), limit=0)


# -- tracing the pocket model -----------------------------------------------------------------------------


def test_tracing_the_pocket_model_finds_its_facts_at_the_subjects_last_token(
    pocket: tuple[nn.Module, Any, list[EditCase]],
) -> None:
    model, tokenizer, cases = pocket
    known = known_cases(model, tokenizer, cases)[:16]
    report = trace(model, tokenizer, known, window=1, samples=6, progress=False)
    assert report.n_records == len(known) and report.num_blocks == 4
    assert report.clean > 0.9
    assert report.corrupted < report.clean - 0.4  # the noise takes most of the fact away
    # The pocket model reads facts at the subject's last token in blocks 0-1 (docs/sandbox.md): restoring the
    # block output there brings back most of what the noise took.
    for layer in (0, 1):
        assert report.indirect_effect("block")[layer] > 0.8 * report.total_effect, report.table()
    # Its prompts end with the subject, so the last block's output there is all the logits see: restoring
    # it gives the clean probability exactly, record by record.
    for row in report.per_record:
        assert math.isclose(row["restored"]["block"][-1], row["clean"], rel_tol=1e-4, abs_tol=1e-6)


# -- tiny models: an independent computation --------------------------------------------------------------


def _oracle(
    model: nn.Module, adapter: TokenAdapter, case: EditCase, kind: str, layers: list[int], noise: torch.Tensor
) -> float:
    """P(true object) averaged over noise samples, one sample per forward, noise added to inputs_embeds."""
    parts = ModelParts(model)
    fact = case.rewrite
    encoded = adapter.prompt(fact.prompt, fact.subject)
    first, last = adapter.fact_index(fact.prompt, fact.subject, "subject_first"), encoded.fact_index
    answer = adapter.target_ids(str(fact.target_true))[0]
    ids = torch.tensor([encoded.ids])
    modules = {i: parts.block(i) if kind == "block" else parts.rewrite(i) for i in layers}
    clean: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _a, o, i=i: clean.__setitem__(i, (o[0] if isinstance(o, tuple) else o))
        )
        for i, m in modules.items()
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()

    def at_last(x: torch.Tensor) -> Any:
        return (0, last) if x.ndim == 3 else last  # OPT's fc2 sees (B·T, d_ff) with B = 1

    def patch(layer: int) -> Any:
        def hook(_m: nn.Module, _a: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[at_last(hidden)] = clean[layer][at_last(clean[layer])]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    probs = []
    for sample in noise:
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[0, first : last + 1] += sample
        handles = [m.register_forward_hook(patch(i)) for i, m in modules.items()]
        with torch.no_grad():
            logits = model(inputs_embeds=embeds).logits[0, -1]
        for h in handles:
            h.remove()
        probs.append(float(logits.softmax(-1)[answer]))
    return sum(probs) / len(probs)


def sharpened(family: str, n_layer: int = 4) -> nn.Module:
    """A tiny random model whose output depends measurably on each restored state: at initialisation the
    MLPs add little and the next-token distribution is nearly flat, so every P would agree to 1e-5."""
    model = tiny_model(family, vocab_size=VOCAB, n_layer=n_layer)
    parts = ModelParts(model)
    with torch.no_grad():
        parts.final_norm.weight.mul_(30)
        for layer in range(parts.num_layers):
            parts.rewrite_weight(layer).mul_(8)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_trace_matches_a_one_sample_at_a_time_computation(family: str, tokens: TokenAdapter) -> None:
    model = sharpened(family)
    cases, samples = tiny_cases()[:2], 2
    with no_hooks_left(model):
        report = trace(model, tokens, cases, window=3, samples=samples, seed=5, progress=False)
    nu = report.settings["noise"]
    width = model.get_input_embeddings().weight.shape[1]
    for row, case in enumerate(cases):
        fact = case.rewrite
        span = tokens.prompt(fact.prompt, fact.subject).fact_index
        span -= tokens.fact_index(fact.prompt, fact.subject, "subject_first") - 1
        noise = _record_noise(5, row, (samples, span, width)) * nu
        got = report.per_record[row]
        assert math.isclose(got["corrupted"], _oracle(model, tokens, case, "block", [], noise), rel_tol=1e-4)
        for layer in range(4):
            block = _oracle(model, tokens, case, "block", [layer], noise)
            window = list(range(max(0, layer - 1), min(4, layer + 2)))  # window 3 around the block
            mlp = _oracle(model, tokens, case, "mlp", window, noise)
            assert math.isclose(got["restored"]["block"][layer], block, rel_tol=1e-4)
            assert math.isclose(got["restored"]["mlp"][layer], mlp, rel_tol=1e-4)
        # The comparison can tell the states apart: they change P by 20 times its tolerance or more.
        for kind in ("block", "mlp"):
            values = got["restored"][kind]
            assert max(values) - min(values) > 20 * 1e-4 * max(values), (kind, values)


def test_default_noise_is_three_times_the_std_of_the_subjects_embeddings(tokens: TokenAdapter) -> None:
    model = tiny_model("llama", vocab_size=VOCAB)
    cases = tiny_cases()
    report = trace(model, tokens, cases, kinds=["block"], samples=1, progress=False)
    rows = []
    for case in cases:
        ids = tokens.encode(case.rewrite.text)
        first = tokens.fact_index(case.rewrite.prompt, case.rewrite.subject, "subject_first")
        last = tokens.fact_index(case.rewrite.prompt, case.rewrite.subject, "subject_last")
        rows.append(model.get_input_embeddings().weight[ids[first : last + 1]].detach())
    expected = NOISE_STD_FACTOR * float(torch.cat(rows).std())
    assert math.isclose(report.settings["noise"], expected, rel_tol=1e-6)
    assert report.settings["noise_rule"].startswith("3 ×")


# -- tiny models: shapes, determinism, batching, layouts, hooks ------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_trace_shapes_batching_and_the_last_block(family: str, tokens: TokenAdapter) -> None:
    model = sharpened(family, n_layer=3)
    cases = tiny_cases()  # "capital city : {}": the subject ends the prompt
    report = trace(model, tokens, cases, samples=3, window=2, batch_size=1000, progress=False)
    assert report.kinds == ("block", "mlp") and report.num_blocks == 3 and report.n_records == 4
    assert all(len(v) == 3 for v in report.restored.values())
    # Forwards of 5 rows: chunks that split the samples of one restoration across two forwards.
    chunked = trace(model, tokens, cases, samples=3, window=2, batch_size=5, progress=False)
    for a, b in zip(report.per_record, chunked.per_record, strict=True):
        for kind in ("block", "mlp"):
            assert torch.allclose(
                torch.tensor(a["restored"][kind]), torch.tensor(b["restored"][kind]), rtol=1e-4, atol=0
            )
        # The subject ends each prompt: restoring the last block's output there restores the logits.
        assert math.isclose(a["restored"]["block"][-1], a["clean"], rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(a["corrupted"], b["corrupted"], rel_tol=1e-4)
    mean = sum(r["restored"]["mlp"][1] for r in report.per_record) / 4
    assert math.isclose(report.restored["mlp"][1], mean, rel_tol=1e-12)
    data = json.loads(json.dumps(report.to_dict()))
    assert [b["block"] for b in data["blocks"]] == [0, 1, 2]
    assert math.isclose(data["blocks"][2]["block_indirect_effect"], report.indirect_effect("block")[2])
    assert data["settings"]["model_type"] == family and len(data["per_record"]) == 4
    assert len(report.table().splitlines()) == 3 + 3


def test_trace_is_deterministic_under_a_seed(tokens: TokenAdapter) -> None:
    model = tiny_model("llama", vocab_size=VOCAB)
    first = trace(model, tokens, tiny_cases(), samples=3, window=1, seed=3, progress=False).to_dict()
    again = trace(model, tokens, tiny_cases(), samples=3, window=1, seed=3, progress=False).to_dict()
    other = trace(model, tokens, tiny_cases(), samples=3, window=1, seed=4, progress=False).to_dict()
    assert first == again
    assert first["corrupted"] != other["corrupted"]
    # A record's noise depends on its position only, not on the records before it.
    alone = trace(
        model,
        tokens,
        tiny_cases()[:1],
        samples=3,
        window=1,
        seed=3,
        noise=first["settings"]["noise"],
        progress=False,
    )
    assert alone.per_record[0]["corrupted"] == first["per_record"][0]["corrupted"]


def test_trace_leaves_the_model_as_it_was(tokens: TokenAdapter) -> None:
    model = tiny_model("gpt2", vocab_size=VOCAB)
    model.train()
    ids = torch.tensor([tokens.encode("capital city : Marie Curie")])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    model.train()
    with no_hooks_left(model):
        trace(model, tokens, tiny_cases(), samples=2, progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_hooks_are_removed_when_a_forward_fails(tokens: TokenAdapter) -> None:
    model = tiny_model("llama", vocab_size=VOCAB)
    model.train()

    def fail(_m: nn.Module, _a: Any, output: Any) -> None:
        if (output[0] if isinstance(output, tuple) else output).shape[0] > 1:  # a corrupted forward
            raise RuntimeError("boom")

    handle = ModelParts(model).block(2).register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            trace(model, tokens, tiny_cases(), samples=2, progress=False)
    finally:
        handle.remove()
    with no_hooks_left(model):
        assert model.training


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"kinds": ["attn"]}, "kinds"),
        ({"kinds": []}, "kinds"),
        ({"window": 0}, "window"),
        ({"samples": 0}, "samples"),
        ({"noise": 0.0}, "noise"),
        ({"noise": -1.0}, "noise"),
        ({"noise": float("inf")}, "noise"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_settings_are_parameter_errors(
    kwargs: dict[str, Any], argument: str, tokens: TokenAdapter
) -> None:
    model = tiny_model("llama", vocab_size=VOCAB)
    with no_hooks_left(model), pytest.raises(ParameterError) as exc:
        trace(model, tokens, tiny_cases(), progress=False, **kwargs)
    assert exc.value.argument == argument


def test_bad_records_are_named(tokens: TokenAdapter) -> None:
    model = tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(ParameterError, match="no records to trace"):
        trace(model, tokens, [], progress=False)
    # The subject is not in the prompt (and there is no {} slot to put it in).
    bad = {"prompt": "The capital of France is", "subject": "Spain", "target": "x", "target_true": "Paris"}
    with pytest.raises(FactError, match="record 1") as exc:
        trace(model, tokens, [tiny_cases()[0].to_dict(), bad], progress=False)
    assert exc.value.row == 1
    no_true = EditCase(7, Fact("capital city : {}", "John Smith", "Rome"))
    with pytest.raises(FactError, match=r"record 2 \(case 7\): has no true object") as exc:
        trace(model, tokens, [*tiny_cases()[:2], no_true], progress=False)
    assert exc.value.row == 2
    report = trace(model, tokens, [tiny_cases()[0].to_dict()], kinds="mlp", samples=1, progress=False)
    assert report.kinds == ("mlp",)
    with pytest.raises(ParameterError, match="no kind 'block'"):
        report.indirect_effect("block")


# -- plot --------------------------------------------------------------------------------------------------


def test_plot_writes_a_figure_or_names_the_missing_extra(
    tokens: TokenAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    model = tiny_model("llama", vocab_size=VOCAB)
    report = trace(model, tokens, tiny_cases(), samples=2, window=2, progress=False)
    out = report.plot(tmp_path / "figs" / "trace.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r"eamet\[plot\]"):
        report.plot(tmp_path / "again.png")


def test_the_names_are_exported_lazily() -> None:
    assert eamet.trace is trace and eamet.TraceReport is TraceReport and eamet.known_cases is known_cases


# -- command line ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    tiny_model("llama", vocab_size=VOCAB, n_layer=3).save_pretrained(root)
    bpe_tokenizer(add_bos=False).save_pretrained(root)
    return root


def _jsonl(path: Path, cases: list[EditCase]) -> Path:
    path.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in cases), encoding="utf-8")
    return path


def test_cli_trace_prints_a_table_and_writes_json_and_a_plot(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _jsonl(tmp_path / "facts.jsonl", tiny_cases())
    args = ["trace", "--model", str(model_dir), "--data", str(data), "--format", "jsonl", "--n", "3"]
    args += ["--kind", "block", "--samples", "2", "--seed", "1", "--json", str(tmp_path / "t.json")]
    args += ["--plot", str(tmp_path / "t.png"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 records, 2 noise samples each" in out and "block restored" in out and "mlp" not in out
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["command"] == "trace" and saved["n_records"] == 3 and len(saved["blocks"]) == 3
    assert saved["settings"]["kinds"] == ["block"] and saved["settings"]["seed"] == 1
    assert (tmp_path / "t.png").stat().st_size > 0


def test_cli_trace_known_only_on_the_pocket_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = default_world().cases[:20]
    data = _jsonl(tmp_path / "world.jsonl", cases)
    args = ["trace", "--model", str(shipped_model_dir()), "--data", str(data), "--format", "jsonl"]
    args += ["--known-only", "--n", "6", "--window", "1", "--samples", "2", "--no-progress"]
    args += ["--json", str(tmp_path / "t.json"), "--device", "cpu"]
    assert main(args) == 0
    assert "6 known records" in capsys.readouterr().out
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["n_records"] == 6 and saved["clean"] > 0.9 and saved["settings"]["window"] == 1


def test_cli_trace_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _jsonl(tmp_path / "facts.jsonl", tiny_cases())
    base = ["trace", "--model", str(model_dir), "--data", str(data), "--format", "jsonl", "--no-progress"]
    # A random model knows none of the facts.
    assert main([*base, "--known-only"]) == 1
    assert "knows none of the 4 records" in capsys.readouterr().err
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps([{"src": "Where is Rome?", "subject": "Rome", "answers": ["Italy"]}]))
    assert main(["trace", "--model", str(model_dir), "--data", str(zsre), "--format", "zsre"]) == 1
    assert "has no true object" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*base, "--kind", "attn"])
    assert exc.value.code == 2
