"""`eamet demo` and `eamet eval` end to end, with the JSON of design.md §2 checked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from eamet.app import demo as demo_module  # noqa: E402
from eamet.app.cli import main  # noqa: E402
from eamet.base.errors import FactError  # noqa: E402
from eamet.base.metrics import RATE_KEYS  # noqa: E402
from eamet.base.records import cases_texts, load_dataset  # noqa: E402
from eamet.sandbox import World, pocket  # noqa: E402
from eamet.sandbox.pocket import PocketSettings, train_pocket  # noqa: E402

SMALL: dict[str, Any] = {
    "hidden": 128, "ffn": 256, "layers": 2, "max_epochs": 40, "target_recall": 0.98, "check_every": 2,
    "lr": 5e-3, "warmup_steps": 20, "batch_size": 16,
}  # fmt: skip


def check_metrics(metrics: dict[str, Any], *, edited: bool) -> None:
    for key in RATE_KEYS:
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["fluency"] is None or metrics["fluency"] >= 0.0
    if edited:
        assert math.isfinite(metrics["misalignment_total"]) and metrics["misalignment_total"] >= 0.0
        assert metrics["edit_seconds"] > 0.0


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAMET_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(2)


def test_demo_quick_on_the_shipped_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--edits", "12", "--json", str(out), "--no-progress"]) == 0
    run = json.loads(out.read_text())
    assert set(run) == {"config", "before", "results"}
    assert run["config"]["edits"] == 12 and run["config"]["methods"] == ["eamet", "memit"]
    assert set(run["results"]) == {"eamet", "memit"}
    check_metrics(run["before"], edited=False)
    for metrics in run["results"].values():
        check_metrics(metrics, edited=True)
    # The pocket model knows its facts; the edits replace them.
    assert run["before"]["efficacy_strict"] == 0.0 and run["before"]["specificity_strict"] >= 0.9
    assert run["results"]["memit"]["efficacy_strict"] >= 0.9
    table = capsys.readouterr().out
    assert "eff strict" in table and "memit" in table and "before" in table


def counterfact_records(n: int) -> list[dict[str, Any]]:
    world = World.generate(seed=5, n_subjects=8 * n, relations_per_subject=1)
    records = []
    for case in [c for c in world.cases if c.neighborhood][:n]:
        rw = case.rewrite
        records.append(
            {
                "case_id": case.case_id,
                "requested_rewrite": {
                    "prompt": rw.prompt,
                    "subject": rw.subject,
                    "target_new": {"str": rw.target},
                    "target_true": {"str": rw.target_true},
                },
                "paraphrase_prompts": list(case.paraphrases),
                "neighborhood_prompts": [p for p, _ in case.neighborhood],
                "generation_prompts": [rw.text],
            }
        )
    return records


def test_demo_builds_a_world_from_a_counterfact_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small settings keep the test fast; the demo's own are those of the shipped model.
    monkeypatch.setattr(pocket, "PocketSettings", lambda arch: PocketSettings(arch=arch, **SMALL))
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(16)))
    out = tmp_path / "demo.json"
    argv = ["demo", "--data", str(data), "--records", "12", "--edits", "4", "--methods", "memit"]
    assert main([*argv, "--quick", "--json", str(out), "--no-progress"]) == 0
    run = json.loads(out.read_text())
    assert run["config"]["world"] == str(data) and set(run["results"]) == {"memit"}
    check_metrics(run["results"]["memit"], edited=True)
    assert run["before"]["efficacy_strict"] == 0.0


def test_demo_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--edits", "999999", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "edit cases" in err and len(err.strip().splitlines()) == 1
    assert main(["demo", "--records", "3"]) == 1
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "rome"])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small world's pocket model saved as a model directory, its first cases as JSONL, and a corpus."""
    root = tmp_path_factory.mktemp("small")
    world = World.generate(seed=1, n_subjects=24, relations_per_subject=3)
    model, tokenizer, _ = train_pocket(world, PocketSettings(**SMALL), progress=False)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "cases.jsonl").write_text("\n".join(json.dumps(c.to_dict()) for c in world.cases[:4]) + "\n")
    corpus = [s for f in world.facts for s in world.statements(f)]
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n")
    return {"root": root, "world": world, "model": model, "tokenizer": tokenizer, "corpus": corpus}


def test_eval_edits_a_saved_model_and_reports_before_and_after(small: dict[str, Any], tmp_path: Path) -> None:
    root, out = small["root"], tmp_path / "eval.json"
    argv = ["eval", "--model", str(root / "model"), "--data", str(root / "cases.jsonl"), "--format", "jsonl"]
    argv += ["--method", "memit", "--corpus", str(root / "corpus.txt"), "--samples", "200", "--layers", "0"]
    assert main([*argv, "--prefix-len", "2", "--json", str(out), "--no-progress"]) == 0
    run = json.loads(out.read_text())
    check_metrics(run["before"], edited=False)
    check_metrics(run["results"]["memit"], edited=True)
    assert len(run["config"]["prefixes"]) == 10 and run["config"]["prefix_len"] == 2


def test_eval_applies_a_saved_edit_to_the_records_it_was_made_from(
    small: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import eamet
    from eamet.sandbox import edit_config

    model, tokenizer, world = small["model"], small["tokenizer"], small["world"]
    editor = eamet.Editor(
        model, tokenizer, config=edit_config(model, "memit", layers=(0,)), corpus=small["corpus"]
    )
    result = editor.edit([c.rewrite for c in world.cases[:4]], progress=False)
    result.undo()
    result.save(tmp_path / "edit.safetensors")
    root, out = small["root"], tmp_path / "eval.json"
    argv = ["eval", "--model", str(root / "model"), "--data", str(root / "cases.jsonl"), "--format", "jsonl"]
    assert (
        main([*argv, "--edit", str(tmp_path / "edit.safetensors"), "--json", str(out), "--no-progress"]) == 0
    )
    run = json.loads(out.read_text())
    after = run["results"]["memit"]
    assert after["efficacy_strict"] > run["before"]["efficacy_strict"]
    assert after["edit_seconds"] is None and after["misalignment_total"] >= 0.0
    # Records the edit was not made from are refused, in one line.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(world.cases[10].to_dict()) + "\n")
    argv = ["eval", "--model", str(root / "model"), "--data", str(other), "--format", "jsonl"]
    capsys.readouterr()
    assert main([*argv, "--edit", str(tmp_path / "edit.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "not facts of" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--edit", str(tmp_path / "edit.safetensors"), "--fact-batch", "2"]) == 1
    assert "--fact-batch only apply with --method" in capsys.readouterr().err

    # --mom2-update-weight with --edit re-solves the saved edit (its residuals) before evaluating it.
    argv = ["eval", "--model", str(root / "model"), "--data", str(root / "cases.jsonl"), "--format", "jsonl"]
    argv += ["--edit", str(tmp_path / "edit.safetensors"), "--corpus", str(root / "corpus.txt")]
    lam = result.config.mom2_update_weight[0] * 1000
    assert main([*argv, "--mom2-update-weight", str(lam), "--json", str(out), "--no-progress"]) == 0
    resolved = json.loads(out.read_text())
    assert resolved["config"]["resolved"] == {"mom2_update_weight": [lam]}
    # A λ a thousand times larger keeps the edit from landing as well as the original λ did.
    assert resolved["results"]["memit"]["efficacy_lenient"] < after["efficacy_lenient"]
    assert resolved["results"]["memit"]["edit_seconds"] > 0


def test_a_failure_during_evaluation_leaves_the_model_unedited(
    small: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from eamet.app.protocol import run_edits
    from eamet.measure import evaluation
    from eamet.sandbox import edit_config

    model, tokenizer, world = small["model"], small["tokenizer"], small["world"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = evaluation.evaluate
    calls: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the evaluation after the edit
            raise RuntimeError("evaluation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_edits(
            model, tokenizer, list(world.cases[:3]), methods=["memit"],
            config_for=lambda m, method: edit_config(m, method, layers=(0,)), corpus=small["corpus"],
            prefix_len=0, seed=0, fluency=False, progress=False, log=lambda _: None,
        )  # fmt: skip
    assert len(calls) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_demo_on_a_real_model_directory(
    small: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eamet demo --model DIR --data FILE``: the same before/after run on any model and data file."""
    root, out = small["root"], tmp_path / "demo.json"
    argv = ["demo", "--model", str(root / "model"), "--data", str(root / "cases.jsonl"), "--edits", "3"]
    argv += ["--methods", "memit", "--corpus", str(root / "corpus.txt"), "--quick", "--no-progress"]
    assert main([*argv, "--json", str(out)]) == 0
    said = capsys.readouterr()
    assert "memit: 3 facts: " in said.out and "NotLandedWarning" not in said.err  # one line, no warning
    run = json.loads(out.read_text())
    assert run["config"]["model"] == str(root / "model") and run["config"]["edits"] == 3
    assert run["config"]["corpus"] == str(root / "corpus.txt")
    check_metrics(run["before"], edited=False)
    check_metrics(run["results"]["memit"], edited=True)


def test_demo_on_a_model_without_shipped_cases_needs_data(
    small: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--model", str(small["root"] / "model"), "--no-progress"]) == 1
    assert "--data COUNTERFACT.json is needed" in capsys.readouterr().err


def test_the_shipped_cases_smollm2_knows() -> None:
    import eamet.models

    cases = eamet.models.known_facts("smollm2")
    assert len(cases) == 454 and len({c.case_id for c in cases}) == 454
    assert cases[0].rewrite.subject == "Danielle Darrieux" and cases[0].rewrite.target_true == "French"
    assert all(c.rewrite.target_true and c.neighborhood and c.paraphrases for c in cases)
    assert [c.case_id for c in eamet.models.known_facts("smollm2-135m", limit=5)] == [
        c.case_id for c in cases[:5]
    ]


def test_demo_on_a_real_model_takes_c_from_the_cases_not_edited(
    small: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without ``--corpus`` C comes from the texts of the cases after the edited ones; editing every case
    leaves none, which is a named error rather than an empty corpus."""
    root = small["root"]
    argv = ["demo", "--model", str(root / "model"), "--data", str(root / "cases.jsonl"), "--edits", "4"]
    assert main([*argv, "--methods", "memit", "--quick", "--no-progress"]) == 1
    assert "C from the cases not edited needs more than 4 cases" in capsys.readouterr().err


def test_the_cases_corpus_reads_enough_texts_whatever_the_preset_samples(
    small: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """C from the cases reads up to CASES_CORPUS_DOCUMENTS of their short texts, not the preset's number of
    sampled documents (SmolLM2's 200 would be too few sentences for a full-rank C); an override wins."""
    seen: list[Any] = []

    def run_edits(model: Any, tokenizer: Any, cases: Any, *, config_for: Any, corpus: Any, **_: Any) -> Any:
        seen.append((config_for(model, "memit"), corpus))
        return {}

    monkeypatch.setattr(demo_module, "run_edits", run_edits)
    root = small["root"]
    demo = {"model": str(root / "model"), "data": str(root / "cases.jsonl"), "edits": 2, "progress": False}
    demo_module.run_demo(**demo, methods=["memit"], log=lambda line: None)
    demo_module.run_demo(**demo, methods=["memit"], log=lambda line: None, overrides={"mom2_n_samples": 7})
    demo_module.run_demo(**demo, methods=["memit"], log=lambda line: None, corpus=str(root / "corpus.txt"))
    cases = load_dataset("jsonl", root / "cases.jsonl")
    assert [config.mom2_n_samples for config, _ in seen[:2]] == [demo_module.CASES_CORPUS_DOCUMENTS, 7]
    assert seen[0][1] == cases_texts(cases[2:])
    assert seen[2][0].mom2_n_samples != demo_module.CASES_CORPUS_DOCUMENTS  # another corpus: the preset's


def test_case_texts_are_every_sentence_of_a_case() -> None:
    case = World.generate(seed=1, n_subjects=4, relations_per_subject=1).cases[0]
    texts = case.texts()
    assert texts[0] == case.rewrite.text
    assert texts[1 : 1 + len(case.paraphrases)] == list(case.paraphrases)
    assert len(texts) == 1 + len(case.paraphrases) + len(case.neighborhood) + len(case.generation_prompts)
    assert all(f"{p} {o}" in texts for p, o in case.neighborhood)
    other = World.generate(seed=1, n_subjects=4, relations_per_subject=1).cases[1]
    assert cases_texts([case, other]) == texts + other.texts()
    assert cases_texts([]) == []
    with pytest.raises(FactError) as info:
        cases_texts([case, case.rewrite])  # type: ignore[list-item]
    assert info.value.row == 1


def test_known_facts_of_an_unknown_model_or_one_without_cases_is_a_parameter_error() -> None:
    import dataclasses

    import eamet.models
    from eamet.base.errors import ParameterError

    with pytest.raises(ParameterError, match="gpt-5"):
        eamet.models.known_facts("gpt-5")
    bare = dataclasses.replace(eamet.models.resolve("smollm2"), known_facts=None)
    with pytest.raises(ParameterError, match="no known facts ship for smollm2-135m"):
        eamet.models.known_facts(bare)
