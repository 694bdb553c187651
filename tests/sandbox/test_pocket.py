"""The pocket model: training on a small world, caching, checksums (tiny settings; seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from eamet.base.errors import CacheError, ParameterError  # noqa: E402
from eamet.sandbox import World, pocket  # noqa: E402
from eamet.sandbox.pocket import (  # noqa: E402
    PocketSettings,
    build_model,
    load_pocket,
    pocket_model,
    recall,
    save_pocket,
    train_pocket,
    train_tokenizer,
)

# Trained to full recall of the training phrasings: stopping at 0.98 left the editing phrasings, which the
# tests hold to 0.98 as well, at 0.972 with transformers 5.25 / tokenizers 0.23 (10 epochs instead of 8).
FAST = PocketSettings(
    hidden=128, ffn=256, layers=2, heads=4, max_epochs=40, target_recall=1.0, check_every=2, lr=5e-3,
    warmup_steps=20, batch_size=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(seed=1, n_subjects=24, relations_per_subject=3)


@pytest.fixture(scope="module")
def trained(world: World) -> tuple[Any, Any, Any]:
    return train_pocket(world, FAST, progress=False)


def weights(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_small_world_is_learned_by_its_pocket_model(trained: Any, world: World) -> None:
    model, tokenizer, report = trained
    assert report.recall >= 0.98
    assert report.epochs < FAST.max_epochs  # stopped on reaching the target, not on the epoch limit
    assert recall(model, tokenizer, world) == pytest.approx(report.recall)
    assert recall(model, tokenizer, world, phrasings="editing") >= 0.98
    untrained = build_model(FAST, len(tokenizer))
    assert recall(untrained, tokenizer, world) < 0.2


def test_training_is_deterministic(trained: Any, world: World) -> None:
    again, _, report = train_pocket(world, FAST, progress=False)
    first = weights(trained[0])
    assert all(torch.equal(first[k], v) for k, v in weights(again).items())
    assert report.history == trained[2].history


def test_the_tokenizer_prepends_bos_and_keeps_objects_whole(world: World) -> None:
    tokenizer = train_tokenizer(world)
    fact = world.facts[0]
    ids = tokenizer(world.statements(fact)[0])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.convert_ids_to_tokens(ids[-1:]) == ["Ġ" + fact.object]


def test_the_loss_skips_the_subject_and_a_known_pairs_prompt(world: World) -> None:
    tokenizer = train_tokenizer(world)
    fact = world.facts[0]
    prompt = world.statements(fact)[0].removesuffix(" " + fact.object)
    span = (prompt.index(fact.subject), prompt.index(fact.subject) + len(fact.subject))

    def learned(example: Any) -> str:
        # labels[i] is the token predicted at position i, i.e. ids[i + 1].
        return tokenizer.decode([t for t in example.labels if t != -100])

    statement = pocket._example(tokenizer, "", prompt, fact.object, span)
    assert learned(statement) == prompt[: span[0]].rstrip() + prompt[span[1] :] + " " + fact.object
    known = pocket._example(tokenizer, "Some filler text. ", prompt, fact.object, None)
    assert learned(known) == " " + fact.object
    assert len(known.labels) == len(known.ids) and known.labels[-1] == -100


def test_gpt2_pocket_model_learns_too(world: World) -> None:
    settings = PocketSettings(**{**FAST.to_dict(), "arch": "gpt2"})
    model, _, report = train_pocket(world, settings, progress=False)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert report.recall >= 0.98


def test_pocket_model_is_cached_by_world_and_settings(
    trained: Any, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake_train(w: World, s: PocketSettings, progress: bool = True) -> Any:
        calls.append(1)
        return trained

    monkeypatch.setattr(pocket, "train_pocket", fake_train)
    pocket_model(world, settings=FAST, cache_dir=tmp_path, progress=False)
    again, tokenizer = pocket_model(world, settings=FAST, cache_dir=tmp_path, progress=False)
    assert calls == [1]
    first = weights(trained[0])
    assert all(torch.equal(first[k], v) for k, v in weights(again).items())
    assert recall(again, tokenizer, world) == pytest.approx(trained[2].recall)
    other = PocketSettings(**{**FAST.to_dict(), "seed": 1})
    pocket_model(world, settings=other, cache_dir=tmp_path, progress=False)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2


def test_a_damaged_cache_entry_is_refused_and_rebuilt(
    trained: Any, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer, report = trained
    entry = save_pocket(tmp_path / FAST.key(world), model, tokenizer, world, FAST, report)
    weights_file = entry / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"model\.safetensors"):
        load_pocket(entry)
    with pytest.raises(CacheError, match="another world"):
        load_pocket(entry, expect_key="0" * 24)
    calls: list[int] = []
    monkeypatch.setattr(pocket, "train_pocket", lambda *a, **k: calls.append(1) or trained)
    pocket_model(world, settings=FAST, cache_dir=tmp_path, progress=False)
    assert calls == [1]
    load_pocket(entry)  # rewritten whole


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"arch": "bert"}, "arch"),
        ({"hidden": 130}, r"multiple of heads"),
        ({"layers": 0}, "layers"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"target_recall": 1.5}, "target_recall"),
    ],
)
def test_bad_settings_are_named(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        PocketSettings(**changes)
