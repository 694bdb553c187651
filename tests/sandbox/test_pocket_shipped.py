"""The pocket model shipped in the package: checksums, recall of its world, where it reads facts, MEMIT."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import eamet  # noqa: E402
from eamet.model.scoring import score_targets  # noqa: E402
from eamet.model.tokens import TokenAdapter  # noqa: E402
from eamet.sandbox import default_world, edit_config, recall, trace_subject, world_corpus  # noqa: E402
from eamet.sandbox.pocket import PocketSettings, load_pocket, shipped_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def shipped() -> tuple[object, object, dict[str, object]]:
    torch.set_num_threads(2)
    return load_pocket(shipped_model_dir())  # checks every file's SHA-256 against the manifest


def test_the_shipped_model_is_the_default_worlds(shipped: tuple[object, object, dict[str, object]]) -> None:
    manifest = shipped[2]
    assert manifest["world_fingerprint"] == default_world().fingerprint()
    assert manifest["settings"] == PocketSettings().to_dict()
    on_disk = json.loads((shipped_model_dir() / "pocket.json").read_text())
    assert set(on_disk["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_the_shipped_model_recalls_its_world(shipped: tuple[object, object, dict[str, object]]) -> None:
    model, tokenizer, _ = shipped
    assert recall(model, tokenizer, default_world()) >= 0.98


def test_the_shipped_model_reads_facts_at_the_subjects_last_token(
    shipped: tuple[object, object, dict[str, object]],
) -> None:
    model, tokenizer, _ = shipped
    trace = trace_subject(model, tokenizer, default_world(), layers=[0, 1], n_pairs=60)
    # Swapping the state after the edited blocks swaps the answer.
    assert min(trace.moved) >= 0.9, trace


# MEMIT must land >= 95 % of a small batch (the sandbox's purpose); EAMET lands fewer on this model (its
# alignment terms pull same-relation residuals together; docs/benchmarks.md), but far more than the 6 % it
# managed under its reference residual cap.
@pytest.mark.parametrize(("method", "bar"), [("memit", 0.95), ("eamet", 0.8)])
def test_both_methods_edit_the_shipped_model_at_small_n(
    method: str,
    bar: float,
    shipped: tuple[object, object, dict[str, object]],
    tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EAMET_CACHE_DIR", str(tmp_path))
    model, tokenizer, _ = shipped
    world = default_world()
    cases = world.cases[:32]
    config = edit_config(model, method)  # type: ignore[arg-type]
    editor = eamet.Editor(model, tokenizer, config=config, corpus=world_corpus(world))
    result = editor.edit([c.rewrite for c in cases], progress=False)
    try:
        scores = score_targets(
            model, TokenAdapter(tokenizer), [c.rewrite.text for c in cases], [c.rewrite.target for c in cases]
        )
    finally:
        result.undo()
    assert float(scores.strict.double().mean()) >= bar
