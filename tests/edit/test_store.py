"""Residuals as an asset: the residual store (prefix and cross-λ reuse, refusal of what does not match,
damaged entries, a full disk, two processes at once) and Editor.resolve (a new solve from an edit's
residuals, equal to a fresh edit; refusals that leave the weights as they were)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import eamet.edit.store as store_module
from eamet import EditConfig
from eamet.base.errors import CacheError, EditMismatchError, ParameterError, SolveError
from eamet.edit.optimizer import ResidualOptimizer
from eamet.edit.results import EditResult
from eamet.edit.store import ResidualStore, residual_settings
from editing_helpers import changed, make_editor, small_config, small_facts, small_model, snapshot
from tiny import bpe_tokenizer

VOCAB = 256
TESTS = Path(__file__).resolve().parent.parent  # the helpers (editing_helpers.py, tiny.py) live there


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer(add_bos=False, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stats")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The facts the residual step optimises (not taken from a store), in order."""
    seen: list[int] = []
    real = ResidualOptimizer.optimize

    def counting(self: ResidualOptimizer, facts: range, saved: torch.Tensor) -> Any:
        seen.extend(facts)
        return real(self, facts, saved)

    monkeypatch.setattr(ResidualOptimizer, "optimize", counting)
    yield seen


def edit(tok: Any, stats_dir: Path, config: EditConfig, facts: Any, store: Path | None = None) -> EditResult:
    model = small_model("gpt2")
    return make_editor(model, tok, config, stats_dir).edit(facts, residual_store=store, progress=False)


def weights_close(a: EditResult, b: EditResult) -> bool:
    return all(
        torch.allclose(x.weight_change(), y.weight_change(), rtol=1e-4, atol=1e-7)
        for x, y in zip(a.updates, b.updates, strict=True)
    )


def config_for(method: str, **overrides: Any) -> EditConfig:
    return small_config(small_model("gpt2"), method, **overrides)  # type: ignore[arg-type]


# -- the store -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "batch"), [("memit", 1), ("eamet", 1), ("eamet", 2)], ids=["memit", "eamet", "eamet-B2"]
)
def test_a_store_serves_any_prefix(
    tok: Any, stats_dir: Path, tmp_path: Path, calls: list[int], method: str, batch: int
) -> None:
    cfg = config_for(method, fact_batch=batch)
    facts = small_facts(6)
    edit(tok, stats_dir, cfg, facts, tmp_path / "store")
    assert calls == list(range(6))
    calls.clear()
    fresh = edit(tok, stats_dir, cfg, facts[:4])
    calls.clear()
    reused = edit(tok, stats_dir, cfg, facts[:4], tmp_path / "store")
    assert calls == [], "a prefix of a stored run was optimised again"
    assert all(s.reused for s in reused.stats)
    assert torch.allclose(reused.deltas, fresh.deltas, rtol=1e-5, atol=1e-6)
    assert weights_close(reused, fresh)
    assert reused.summary()["residual_seconds"] == 0


def test_eamet_reuses_nothing_after_a_changed_fact(
    tok: Any, stats_dir: Path, tmp_path: Path, calls: list[int]
) -> None:
    cfg = config_for("eamet")
    facts = small_facts(5)
    edit(tok, stats_dir, cfg, facts, tmp_path / "store")
    calls.clear()
    changed_second = [facts[0], small_facts(1, offset=9)[0], *facts[2:]]
    edit(tok, stats_dir, cfg, changed_second, tmp_path / "store")
    assert calls == [1, 2, 3, 4], "EAMET reused residuals whose alignment saw another fact"


@pytest.mark.parametrize("method", ["memit", "eamet"])
def test_a_store_serves_other_solves(
    tok: Any, stats_dir: Path, tmp_path: Path, calls: list[int], method: str
) -> None:
    cfg = config_for(method)
    facts = small_facts(4)
    edit(tok, stats_dir, cfg, facts, tmp_path / "store")
    changes: list[dict[str, Any]] = [{"mom2_update_weight": cfg.mom2_update_weight[0] * 4}]
    if method == "memit":  # the store's keys are the same code for both; one method covers the rest
        changes += [
            {"layers": cfg.layers[-1:], "mom2_update_weight": cfg.mom2_update_weight[-1:]},
            {"solver": "inverse", "mom2_n_samples": 40},
        ]
    for change in changes:
        other = cfg.replace(**change)
        calls.clear()
        reused = edit(tok, stats_dir, other, facts, tmp_path / "store")
        assert calls == [], f"{change} re-ran the residual step"
        calls.clear()
        fresh = edit(tok, stats_dir, other, facts)
        assert weights_close(reused, fresh), change


def test_a_residual_setting_changes_every_key(
    tok: Any, stats_dir: Path, tmp_path: Path, calls: list[int]
) -> None:
    cfg = config_for("memit")
    facts = small_facts(3)
    edit(tok, stats_dir, cfg, facts, tmp_path / "store")
    for change in ({"v_lr": 0.25}, {"clamp_factor": 0.5}, {"v_num_grad_steps": 4}, {"seed": 7}):
        calls.clear()
        edit(tok, stats_dir, cfg.replace(**change), facts, tmp_path / "store")
        assert calls == [0, 1, 2], f"{change} reused residuals made with other settings"
    # Settings at their default are left out of the key; the solve's never count.
    assert residual_settings(cfg.replace(v_lr=0.25))["v_lr"] == 0.25 and "v_lr" not in residual_settings(cfg)
    assert residual_settings(cfg.replace(mom2_update_weight=1.0)) == residual_settings(cfg)


def test_damaged_and_foreign_entries_are_recomputed(
    tok: Any, stats_dir: Path, tmp_path: Path, calls: list[int]
) -> None:
    cfg = config_for("memit")
    facts = small_facts(3)
    first = edit(tok, stats_dir, cfg, facts, tmp_path / "store")
    entries = sorted((tmp_path / "store" / "residuals").glob("*/*.safetensors"))
    assert len(entries) == 3
    # Entry 0: bytes flipped in its tensors; entry 1: another entry's file under its name.
    data = bytearray(entries[0].read_bytes())
    data[-3] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    entries[1].write_bytes(entries[2].read_bytes())
    calls.clear()
    with pytest.warns(UserWarning, match="damaged residual store entry"):
        again = edit(tok, stats_dir, cfg, facts, tmp_path / "store")
    assert len(calls) == 2
    assert torch.allclose(again.deltas, first.deltas, rtol=1e-5, atol=1e-6)
    calls.clear()
    edit(tok, stats_dir, cfg, facts, tmp_path / "store")  # the recomputed entries replaced the bad ones
    assert calls == []


def test_a_store_that_cannot_be_written_is_a_cache_error(
    tok: Any, stats_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(path: Any, *_a: Any, **_k: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "atomic_save_tensors", full_disk)
    model = small_model("gpt2")
    before = snapshot(model)
    with pytest.raises(CacheError, match=r"cannot write to the residual store.*No space left"):
        make_editor(model, tok, config_for("memit"), stats_dir).edit(
            small_facts(2), residual_store=tmp_path / "store", progress=False
        )
    assert changed(model, before) == set()
    assert not list((tmp_path / "store").rglob("*.safetensors"))


def test_a_store_path_that_is_a_file_is_a_cache_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="not a directory"):
        ResidualStore(tmp_path / "file")


_WORKER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from editing_helpers import make_editor, small_config, small_facts, small_model
    from tiny import bpe_tokenizer
    model = small_model("gpt2")
    result = make_editor(model, bpe_tokenizer(add_bos=False, vocab_size=256),
                         small_config(model, "eamet"), {stats!r}).edit(
        small_facts(5), residual_store={store!r}, progress=False)
    torch.save(result.deltas, sys.argv[1])
    """
)


def test_two_processes_share_a_store(tok: Any, stats_dir: Path, tmp_path: Path, calls: list[int]) -> None:
    store = tmp_path / "store"
    script = _WORKER.format(tests=str(TESTS), stats=str(stats_dir), store=str(store))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"d{i}.pt")], env=env)
        for i in range(2)
    ]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    first, second = (torch.load(tmp_path / f"d{i}.pt") for i in range(2))
    assert torch.allclose(first, second, rtol=1e-5, atol=1e-6)
    assert len(ResidualStore(store)) == 5
    calls.clear()
    again = edit(tok, stats_dir, config_for("eamet"), small_facts(5), store)
    assert calls == []
    assert torch.allclose(again.deltas, first, rtol=1e-5, atol=1e-6)


# -- re-solve ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tok: Any, stats_dir: Path) -> EditResult:
    """An EAMET edit of 4 facts on two blocks, undone (the model is left unedited)."""
    model = small_model("gpt2")
    result = make_editor(model, tok, config_for("eamet"), stats_dir).edit(small_facts(4), progress=False)
    result.undo()
    return result


@pytest.mark.parametrize(
    "change",
    [
        {"mom2_update_weight": 4.0},
        {"mom2_update_weight": (0.5, 2.0)},
        {"layers": "last"},
        {"solver": "inverse", "mom2_n_samples": 40},
    ],
    ids=["lambda", "lambda-per-block", "last-block-only", "solver-and-samples"],
)
def test_resolve_equals_a_fresh_edit(
    tok: Any, stats_dir: Path, made: EditResult, calls: list[int], change: dict[str, Any]
) -> None:
    expected = dict(change)
    if change.get("layers") == "last":
        change = {"layers": made.config.layers[-1:]}  # block 1 keeps its λ
        expected = {**change, "mom2_update_weight": made.config.mom2_update_weight[-1:]}
    model = small_model("gpt2")
    resolved = make_editor(model, tok, made.config, stats_dir).resolve(made, progress=False, **change)
    assert calls == [], "re-solving ran the residual step"
    assert resolved.applied and torch.equal(resolved.deltas, made.deltas)
    fresh_model = small_model("gpt2")
    fresh = make_editor(fresh_model, tok, made.config.replace(**expected), stats_dir).edit(
        small_facts(4), progress=False
    )
    assert resolved.config == fresh.config
    assert weights_close(resolved, fresh)
    # Exactly: the re-solve collects the first block's keys and the hidden states at l* in one forward
    # over the same batches as a fresh edit (on the pocket model, hidden states from a separate
    # bare-prompt pass differed from the edit's by float32 rounding).
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh_model.state_dict()[name]), name
    resolved.undo()
    assert changed(model, snapshot(small_model("gpt2"))) == set()


@pytest.fixture
def key_forwards(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """The blocks whose keys each key forward of an editor collects, in order."""
    import eamet.edit.editor as editor_module

    seen: list[tuple[int, ...]] = []
    real = editor_module.collect_layers

    def counting(*args: Any, key_layers: Any, **kwargs: Any) -> Any:
        seen.append(tuple(key_layers))
        return real(*args, key_layers=key_layers, **kwargs)

    monkeypatch.setattr(editor_module, "collect_layers", counting)
    yield seen


def test_each_operation_runs_the_key_forwards_it_needs(
    tok: Any, stats_dir: Path, key_forwards: list[tuple[int, ...]]
) -> None:
    """On the unedited model one forward gives every block's keys; only a block after an updated one
    needs its own (its keys move with the update)."""
    config = config_for("memit")
    first, last = config.layers
    editor = make_editor(small_model("gpt2"), tok, config, stats_dir)
    result = editor.edit(small_facts(4), progress=False)
    assert key_forwards == [(first, last), (last,)]
    result.undo()
    key_forwards.clear()
    editor.resolve(result, mom2_update_weight=4.0, progress=False).undo()
    assert key_forwards == [(first,), (last,)]
    key_forwards.clear()
    editor.capacity(small_facts(4), progress=False)
    assert key_forwards == [(first, last)]
    key_forwards.clear()
    one_block = make_editor(small_model("gpt2"), tok, config.on_layers([last]), stats_dir)
    one_block.edit(small_facts(4), progress=False)
    assert key_forwards == [(last,)]
    key_forwards.clear()
    three_blocks = make_editor(small_model("gpt2"), tok, config.on_layers([0, 1, 2]), stats_dir)
    three_blocks.edit(small_facts(4), progress=False)
    assert key_forwards == [(0, 2), (1,), (2,)]


def test_resolve_from_a_file(tok: Any, stats_dir: Path, made: EditResult, tmp_path: Path) -> None:
    made.save(tmp_path / "edit.safetensors")
    loaded = EditResult.load(tmp_path / "edit.safetensors")
    assert loaded.model_fingerprint == made.model_fingerprint != ""
    model = small_model("gpt2")
    resolved = make_editor(model, tok, made.config, stats_dir).resolve(loaded, mom2_update_weight=3.0)
    assert resolved.config.mom2_update_weight == (3.0, 3.0)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"v_lr": 0.1}, ParameterError, "would change the residuals"),
        ({"layers": (0,)}, ParameterError, "residuals live at block"),
        ({"mom2_update_weight": -1.0}, ParameterError, "mom2_update_weight"),
    ],
)
def test_resolve_refuses_what_it_cannot_honour(
    tok: Any, stats_dir: Path, made: EditResult, change: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = small_model("gpt2")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        make_editor(model, tok, made.config, stats_dir).resolve(made, **change)
    assert changed(model, before) == set()


def test_resolve_refuses_another_or_an_edited_model(tok: Any, stats_dir: Path, made: EditResult) -> None:
    other = small_model("gpt2", seed=1)
    before = snapshot(other)
    with pytest.raises(EditMismatchError, match="differ from those the edit was made on"):
        make_editor(other, tok, made.config, stats_dir).resolve(made, mom2_update_weight=3.0)
    assert changed(other, before) == set()
    model = small_model("gpt2")
    made.apply(model)
    try:
        with pytest.raises(EditMismatchError, match="undo it first"):
            make_editor(model, tok, made.config, stats_dir).resolve(made, mom2_update_weight=3.0)
    finally:
        made.undo()
    # A weight outside the edited blocks (the head) changed: only the whole-model fingerprint sees it.
    head = small_model("gpt2")
    with torch.no_grad():
        head.lm_head.weight.add_(1e-3)
    with pytest.raises(EditMismatchError, match="model's weights differ"):
        make_editor(head, tok, made.config, stats_dir).resolve(made, mom2_update_weight=3.0)


def test_a_failed_resolve_leaves_the_weights(
    tok: Any, stats_dir: Path, made: EditResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eamet.edit.editor as editor_module

    real = editor_module.solve_layer
    seen: list[int] = []

    def second_fails(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        if len(seen) == 2:
            raise SolveError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(editor_module, "solve_layer", second_fails)
    model = small_model("gpt2")
    before = snapshot(model)
    with pytest.raises(SolveError, match="injected"):
        make_editor(model, tok, made.config, stats_dir).resolve(made, mom2_update_weight=3.0)
    assert changed(model, before) == set()


# -- per-fact outcomes -------------------------------------------------------------------------------------


def test_outcomes_say_which_facts_landed(tok: Any, stats_dir: Path, made: EditResult, tmp_path: Path) -> None:
    from eamet.base.errors import NotLandedWarning
    from eamet.base.facts import fill
    from eamet.model.scoring import score_targets
    from eamet.model.tokens import TokenAdapter

    assert len(made.outcomes) == 4
    assert [o.residual_nll for o in made.outcomes] == [s.nll for s in made.stats]
    # A λ this large leaves every residual unrealised: nothing lands, and one warning names the facts.
    model = small_model("gpt2")
    with pytest.warns(
        NotLandedWarning, match=r"4 facts: 0 landed, 4 did not: #0 'Danielle Darrieux'"
    ) as caught:
        starved = make_editor(model, tok, made.config, stats_dir).resolve(made, mom2_update_weight=1e9)
    assert len(caught) == 1
    assert starved.not_landed() == [0, 1, 2, 3]
    scores = score_targets(
        model,
        TokenAdapter(tok),
        [fill(f.prompt, f.subject) for f in made.facts],
        [f.target for f in made.facts],
    )
    assert [o.landed for o in starved.outcomes] == scores.strict.tolist()
    assert [o.nll for o in starved.outcomes] == pytest.approx(scores.nll.tolist())
    starved.undo()
    assert starved.summary()["landed"] == 0
    made.save(tmp_path / "e.safetensors")
    assert EditResult.load(tmp_path / "e.safetensors").outcomes == made.outcomes
    assert made.outcome_line(limit=1).startswith(f"4 facts: {4 - len(made.not_landed())} landed")
