"""The residual step's speed levers change nothing they should not (issue: a fast residual step).

* ``z_forward="fast"`` (blocks up to l* once per batch, logits only where scored) gives the residuals of
  ``"full"`` (the whole model at every iteration, the reference's way), on every registered family;
* ``fact_batch`` > 1 is exact for MEMIT (each residual is what it is alone), also with facts stopping early at
  different iterations, an uneven last batch and the token budget splitting a batch into several forwards;
* EAMET's in-batch alignment options do what they say; ``z_dtype`` resolves and runs in bfloat16;
* an ArchSpec whose head does not give the model's logits is caught by the first-batch check.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from eamet import ArchSpec, EditConfig, Fact
from eamet.base.arch import arch_for
from eamet.edit.optimizer import ResidualOptimizer
from eamet.edit.residual_forward import ResidualInjector
from eamet.model.device import resolve_z_dtype
from editing_helpers import make_editor, small_config, small_facts, small_model
from tiny import bpe_tokenizer

FAMILIES = (
    "gpt2",
    "gptj",
    "gpt_neox",
    "llama",
    "mistral",
    "qwen2",
    "falcon",
    "gemma",
    "phi",
    "gpt_neo",
    "qwen3",
    "phi3",
    "olmo",
    "opt",
    "stablelm",
    "starcoder2",
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer(add_bos=False, vocab_size=256)


def edit(model: Any, tok: Any, config: EditConfig, stats_dir: Path, n: int = 4) -> Any:
    result = make_editor(model, tok, config, stats_dir).edit(mixed_facts(n), progress=False)
    result.undo()
    return result


def mixed_facts(n: int) -> list[Fact]:
    """``small_facts(n)`` with a two- and a three-token target among them, so that a batch pads targets."""
    facts = small_facts(n)
    longer = {1: "Berlin Tokyo", 4: "official language people"}
    return [replace(f, target=longer[i]) if i in longer else f for i, f in enumerate(facts)]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) <= rtol * scale + 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_forward_gives_the_full_forwards_residuals(family: str, tok: Any, tmp_path: Path) -> None:
    model = small_model(family)
    # Edited blocks 1-2 of 4: blocks 0-1 are handed through on the fast path, block 3 runs after the edit.
    # (Falcon's block-1 keys need C over more text to be positive definite, as in edit/test_editing.py.)
    samples = 400 if family == "falcon" else 50
    config = small_config(model, "eamet", layers=(1, 2), clamp_factor=4.0, mom2_n_samples=samples)
    fast = edit(model, tok, config, tmp_path)
    full = edit(model, tok, config.replace(z_forward="full"), tmp_path)
    assert close(fast.deltas, full.deltas), family
    assert [s.steps for s in fast.stats] == [s.steps for s in full.stats]
    assert all(abs(a.nll - b.nll) <= 1e-4 * (1 + b.nll) for a, b in zip(fast.stats, full.stats, strict=True))
    assert float(fast.deltas.norm()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_cached_prefix_path(family: str, tok: Any, tmp_path: Path) -> None:
    """The fastest path (positions before the fact token cached in every block) is the one chosen; it
    gives the whole model's scores, and they move when its cached states are wrong."""
    from eamet.edit.keys import PromptSet
    from eamet.edit.residual_forward import CachedSuffixForward, FactBatch, FullForward
    from eamet.edit.residual_records import KeyNeighborhood

    model = small_model(family)
    samples = 400 if family == "falcon" else 50
    config = small_config(model, "eamet", layers=(1, 2), mom2_n_samples=samples)
    editor = make_editor(model, tok, config, tmp_path)
    # Targets of 1 to 3 tokens: the batch pads them.
    prompts = PromptSet.build(editor.tokens, mixed_facts(5), editor._templates(), config.fact_token)
    keys = editor._keys(prompts, [2], False)[0][2]
    optimizer = ResidualOptimizer(
        model, editor.parts, editor.tokens, config, prompts, KeyNeighborhood.of(keys)
    )
    batch = FactBatch.build(editor.tokens, prompts, range(5), config, torch.device("cpu"))
    with torch.no_grad():
        chosen = optimizer._choose_forward(batch)
        assert isinstance(chosen, CachedSuffixForward), family
        sub, rows = batch.select(torch.arange(5))
        full = FullForward(model, editor.parts, 2, editor.parts.num_layers - 1)
        probe = 0.5 * full.bare_hidden(batch, None)
        prepared = chosen.prepare(batch, torch.float32)
        prepared.keys = [k * 2 for k in prepared.keys]
        wrong = chosen.log_probs(sub, prepared, rows, probe, torch.float32)[0]
        right = full.log_probs(sub, None, rows, probe, torch.float32)[0]
        assert float((wrong - right).abs().max()) > 1e-5, "the cached states are not read"


def test_fast_forward_scores_an_earlier_block(tok: Any, tmp_path: Path) -> None:
    """v_loss_layer before the last block: the fast path stops there, like the full one."""
    model = small_model("llama")
    config = small_config(model, "memit", layers=(0, 1), v_loss_layer=2)
    assert close(
        edit(model, tok, config, tmp_path).deltas,
        edit(model, tok, config.replace(z_forward="full"), tmp_path).deltas,
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memit_batches_are_exact(family: str, tok: Any, tmp_path: Path) -> None:
    model = small_model(family)
    # An early stop that about half the facts reach, at different iterations: the median final loss.
    # (No norm penalty: at a tiny model's ‖h‖ MEMIT's penalty outweighs the NLL and the loss rises.)
    config = small_config(model, "memit", v_num_grad_steps=8, early_stop_loss=0.0, norm_penalty="none")
    finals = sorted(s.loss for s in edit(model, tok, config, tmp_path, n=7).stats)
    config = config.replace(early_stop_loss=finals[3])
    serial = edit(model, tok, config, tmp_path, n=7)
    steps = [s.steps for s in serial.stats]
    assert len(set(steps)) > 1, f"every fact took {steps[0]} steps: the early stop is not exercised"
    for batch in (3, 7):
        batched = edit(model, tok, config.replace(fact_batch=batch), tmp_path, n=7)
        assert close(batched.deltas, serial.deltas), batch
        assert [s.steps for s in batched.stats] == steps
        for a, b in zip(batched.stats, serial.stats, strict=True):
            assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-6)
            assert a.radius == pytest.approx(b.radius, rel=1e-6)
    # A token budget of one fact per forward splits the batch; the gradients add up to the same step.
    chunked = edit(model, tok, config.replace(fact_batch=7, z_chunk_tokens=1), tmp_path, n=7)
    assert close(chunked.deltas, serial.deltas)


def test_eamet_batch_alignment_options(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")
    config = small_config(model, "eamet", fact_batch=4)
    serial = edit(model, tok, config.replace(fact_batch=1), tmp_path)
    none = edit(model, tok, config.replace(batch_alignment="none"), tmp_path)
    current = edit(model, tok, config.replace(batch_alignment="current"), tmp_path)
    second = edit(model, tok, config.replace(batch_alignment="second_pass"), tmp_path)
    # One batch holds every fact: with "none" no fact has a residual to align against.
    assert all(s.alignment_kl == 0 and s.topm_mse == 0 for s in none.stats)
    # The first fact never has one; the others do, against the batch's own earlier facts (over a single
    # earlier fact the KL is 0 by definition: both distributions are that one fact).
    for run in (serial, current, second):
        assert run.stats[0].alignment_kl == 0 and run.stats[0].topm_mse == 0
        assert all(s.topm_mse > 0 for s in run.stats[1:])
        assert all(s.alignment_kl > 0 for s in run.stats[2:])
    assert not close(none.deltas, serial.deltas, rtol=1e-3)
    assert not close(current.deltas, second.deltas, rtol=1e-6)


def test_eamet_first_batch_of_one_fact_equals_serial(tok: Any, tmp_path: Path) -> None:
    """Batches of one fact are the reference's serial order, whatever the in-batch option says."""
    model = small_model("llama")
    config = small_config(model, "eamet")
    serial = edit(model, tok, config, tmp_path)
    assert torch.equal(
        serial.deltas, edit(model, tok, config.replace(batch_alignment="none"), tmp_path).deltas
    )


def test_align_below_nll_gates_the_alignment_terms(tok: Any, tmp_path: Path) -> None:
    """eamet's extension: a gate no NLL passes is EAMET without alignment terms; one every NLL passes is
    the reference loss."""
    model = small_model("llama")
    config = small_config(model, "eamet")
    reference = edit(model, tok, config, tmp_path)
    unaligned = edit(model, tok, config.replace(cs_factor=0.0, mse_factor=0.0), tmp_path)
    closed = edit(model, tok, config.replace(align_below_nll=1e-30), tmp_path)
    open_ = edit(model, tok, config.replace(align_below_nll=1e30), tmp_path)
    assert torch.equal(closed.deltas, unaligned.deltas)
    assert torch.equal(open_.deltas, reference.deltas)
    assert not close(reference.deltas, unaligned.deltas, rtol=1e-3)


def test_resume_after_a_kill_mid_batches(tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model("gpt2")
    config = small_config(model, "eamet", fact_batch=2)
    facts = small_facts(5)
    reference = make_editor(model, tok, config, tmp_path / "stats").edit(facts, progress=False)
    reference.undo()
    real = ResidualOptimizer.optimize
    calls: list[list[int]] = []

    def dying(self: ResidualOptimizer, batch: range, saved: torch.Tensor) -> Any:
        calls.append(list(batch))
        if batch.start == 2:
            raise KeyboardInterrupt
        return real(self, batch, saved)

    monkeypatch.setattr(ResidualOptimizer, "optimize", dying)
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        make_editor(model, tok, config, tmp_path / "stats").edit(facts, residual_store=store, progress=False)
    calls.clear()
    monkeypatch.setattr(ResidualOptimizer, "optimize", lambda s, b, v: calls.append(list(b)) or real(s, b, v))
    resumed = make_editor(model, tok, config, tmp_path / "stats").edit(
        facts, residual_store=store, progress=False
    )
    assert calls == [[2, 3], [4]], "the resumed run redid a saved batch or skipped one"
    assert torch.equal(resumed.deltas, reference.deltas)


def test_bfloat16_residual_step_runs_and_stays_close(tok: Any, tmp_path: Path) -> None:
    model = small_model("llama")
    config = small_config(model, "memit", fact_batch=4)
    f32 = edit(model, tok, config.replace(z_dtype="float32"), tmp_path)
    bf16 = edit(model, tok, config.replace(z_dtype="bfloat16"), tmp_path)
    assert bf16.deltas.dtype == torch.float32
    assert not torch.equal(bf16.deltas, f32.deltas), "bfloat16 changed nothing: autocast did not apply"
    cosine = torch.nn.functional.cosine_similarity(bf16.deltas, f32.deltas, dim=1)
    assert float(cosine.min()) > 0.9


def test_z_dtype_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_z_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_z_dtype("auto", cpu) == torch.bfloat16
    assert resolve_z_dtype("float32", cpu) == torch.float32
    assert resolve_z_dtype("bfloat16", torch.device("mps")) == torch.bfloat16
    assert resolve_z_dtype("auto", torch.device("mps")) == torch.float32


def test_a_head_that_is_not_the_models_falls_back_to_the_full_forward(tok: Any, tmp_path: Path) -> None:
    model = small_model("llama")
    with torch.no_grad():  # the real final norm's weights are no longer all 1 ...
        model.model.norm.weight.copy_(torch.linspace(0.5, 1.5, model.model.norm.weight.numel()))
    spec = arch_for(model)
    # ... so a "final norm" that is another RMSNorm (weights 1) makes the fast path's logits wrong.
    wrong = ArchSpec(spec.blocks, spec.rewrite, "model.layers.0.input_layernorm", spec.unembed)
    config = small_config(model, "memit", modules=wrong)
    with pytest.warns(UserWarning, match="fast paths differ"):
        fallback = edit(model, tok, config, tmp_path)
    full = edit(model, tok, config.replace(z_forward="full"), tmp_path)
    assert torch.equal(fallback.deltas, full.deltas)


def test_injector_adds_each_row_at_its_position() -> None:
    hidden = torch.zeros(3, 4, 2)
    deltas = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    out = ResidualInjector(deltas, torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2]))(hidden)
    expected = torch.zeros(3, 4, 2)
    expected[0, 3], expected[1, 0], expected[2, 2] = deltas[0], deltas[1], deltas[1]
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fact_batch", 0),
        ("z_chunk_tokens", 0),
        ("z_dtype", "float16"),
        ("z_forward", "x"),
        ("batch_alignment", "all"),
        ("align_below_nll", 0.0),
        ("align_below_nll", float("nan")),
    ],
)
def test_bad_speed_settings_are_parameter_errors(field: str, value: Any) -> None:
    from eamet.base.errors import ParameterError

    with pytest.raises(ParameterError, match=field):
        EditConfig(**{field: value})
