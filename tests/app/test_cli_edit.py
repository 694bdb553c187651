"""`eamet edit` and `eamet stats` end to end, on a tiny model saved to disk (the from_pretrained path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eamet.app.cli import main
from eamet.edit.editor import EditResult
from tiny import bpe_tokenizer, corpus, tiny_model

FACTS = [("Alan Turing", "Paris"), ("Marie Curie", "Tokyo"), ("Niels Bohr", "London")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    tiny_model("llama", vocab_size=256, n_layer=4, hidden=32, ffn=64).save_pretrained(root)
    bpe_tokenizer(add_bos=False).save_pretrained(root)
    (root / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    return root


def _facts(path: Path, facts: list[tuple[str, str]]) -> Path:
    lines = [json.dumps({"prompt": "capital city : {}", "subject": s, "target": t}) for s, t in facts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _edit_args(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "edit",
        "--model",
        str(model_dir),
        "--facts",
        str(_facts(tmp_path / "facts.jsonl", FACTS)),
        "--out",
        str(tmp_path / "edit.safetensors"),
        "--corpus",
        str(model_dir / "corpus.txt"),
        "--samples",
        "100",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        *extra,
    ]


def test_edit_writes_an_edit_that_applies_to_the_saved_model(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    args = _edit_args(model_dir, tmp_path, "--method", "memit", "--json", str(tmp_path / "s.json"))
    assert main(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["command"] == "edit" and summary["facts"] == len(FACTS) and summary["method"] == "memit"
    result = EditResult.load(tmp_path / "edit.safetensors")
    assert [f.subject for f in result.facts] == [s for s, _ in FACTS]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result.apply(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in result.config.layers}
    result.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_edit_layers_and_seed_options_reach_the_config(model_dir: Path, tmp_path: Path) -> None:
    assert main(_edit_args(model_dir, tmp_path, "--layers", "1", "--seed", "7", "--method", "memit")) == 0
    config = EditResult.load(tmp_path / "edit.safetensors").config
    assert config.layers == (1,) and config.seed == 7 and len(config.mom2_update_weight) == 1


def test_edit_align_below_nll_sets_or_turns_off_the_gate(model_dir: Path, tmp_path: Path) -> None:
    from eamet.base.settings import EditConfig

    gated = tmp_path / "gated.json"
    gated.write_text(
        EditConfig.for_method("eamet", layers=(1,), mom2_update_weight=(50.0,))
        .replace(align_below_nll=0.5, v_num_grad_steps=2)
        .to_json(),
        encoding="utf-8",
    )
    for option, expected in (("0.25", 0.25), ("off", None)):
        argv = _edit_args(model_dir, tmp_path, "--config", str(gated), "--align-below-nll", option)
        assert main(argv) == 0
        assert EditResult.load(tmp_path / "edit.safetensors").config.align_below_nll == expected
    assert main(_edit_args(model_dir, tmp_path, "--config", str(gated))) == 0
    assert EditResult.load(tmp_path / "edit.safetensors").config.align_below_nll == 0.5
    with pytest.raises(SystemExit):
        main(_edit_args(model_dir, tmp_path, "--align-below-nll", "0"))


def test_edit_from_a_saved_edit_re_solves_it(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert main(_edit_args(model_dir, tmp_path, "--method", "memit", "--residual-store", str(store))) == 0
    first = EditResult.load(tmp_path / "edit.safetensors")
    assert len(list(store.glob("residuals/*/*.safetensors"))) == len(FACTS)
    capsys.readouterr()
    # The same edit again: every residual comes from the store.
    assert main(_edit_args(model_dir, tmp_path, "--method", "memit", "--residual-store", str(store))) == 0
    assert f"({len(FACTS)} residuals from the store)" in capsys.readouterr().out
    out = tmp_path / "resolved.safetensors"
    common = ["--model", str(model_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    common += ["--corpus", str(model_dir / "corpus.txt"), "--samples", "100", "--no-progress"]
    argv = ["edit", "--from", str(tmp_path / "edit.safetensors"), *common]
    assert main([*argv, "--mom2-update-weight", "7,9"]) == 0
    assert "residuals reused" in capsys.readouterr().out
    resolved = EditResult.load(out)
    assert resolved.config.mom2_update_weight == (7.0, 9.0)
    assert torch.equal(resolved.deltas, first.deltas) and all(s.reused for s in resolved.stats)
    assert not torch.equal(resolved.updates[0].solved_keys, first.updates[0].solved_keys)
    # What a re-solve cannot honour is a one-line error.
    assert main([*argv, "--method", "eamet"]) == 1
    assert "--method would change the residuals" in capsys.readouterr().err
    assert main([*argv, "--layers", "0"]) == 1
    assert "residuals live at block" in capsys.readouterr().err
    assert main([*argv, "--mom2-update-weight", "1,2,3"]) == 1
    assert "one finite λ >= 0 per layer" in capsys.readouterr().err


def test_edit_says_which_facts_landed_and_strict_fails_on_a_miss(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.json"
    starved = ("--method", "memit", "--mom2-update-weight", "1e9", "--json", str(out), "--strict")
    assert main(_edit_args(model_dir, tmp_path, *starved)) == 3
    captured = capsys.readouterr()
    assert f"{len(FACTS)} facts: 0 landed, {len(FACTS)} did not: #0 'Alan Turing' → 'Paris'" in captured.out
    assert "did not land (--strict)" in captured.err
    per_fact = json.loads(out.read_text())["per_fact"]
    assert [(f["index"], f["subject"], f["landed"]) for f in per_fact] == [
        (i, s, False) for i, (s, _) in enumerate(FACTS)
    ]
    assert all(f["nll"] > 0 for f in per_fact)
    assert (tmp_path / "edit.safetensors").exists()  # the edit is written all the same


def test_an_unknown_model_fails_fast_offline_naming_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: never try the network
    facts = _facts(tmp_path / "f.jsonl", FACTS[:1])
    began = time.perf_counter()
    assert main(["edit", "--model", "smollm3", "--facts", str(facts), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "'smollm3' is not a local directory, not a model eamet knows (smollm2-135m" in err
    assert len(err.strip().splitlines()) == 1 and time.perf_counter() - began < 30


def test_edit_rejects_conflicting_facts_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = _facts(tmp_path / "f.jsonl", [("Alan Turing", "Paris"), ("Alan Turing", "Rome")])
    code = main(["edit", "--model", str(tmp_path / "no-such-model"), "--facts", str(facts), "--out", "x"])
    err = capsys.readouterr().err
    assert code == 1 and "fact 1 conflicts with fact 0" in err and len(err.strip().splitlines()) == 1


def test_edit_reports_a_bad_facts_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "x {}", "subject": "a", "target": "b"}\n{not json\n', encoding="utf-8")
    assert main(["edit", "--model", "m", "--facts", str(path), "--out", "x"]) == 1
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err


def test_edit_unknown_preset_is_a_one_line_error(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_edit_args(model_dir, tmp_path, "--preset", "gpt-17")) == 1
    assert "unknown preset 'gpt-17'" in capsys.readouterr().err


@pytest.mark.parametrize("layers", ["a,b", "-1", ""])
def test_bad_layers_is_a_usage_error(layers: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["stats", "--model", "m", "--layers", layers, "--corpus", "c.txt"])
    assert exc.value.code == 2


def test_stats_fills_the_cache_once(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "stats",
        "--model",
        str(model_dir),
        "--layers",
        "0,2",
        "--corpus",
        str(model_dir / "corpus.txt"),
        "--samples",
        "50",
        "--out",
        str(tmp_path / "cache"),
        "--no-progress",
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert main(args) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["layers"]
    assert [r["layer"] for r in rows] == [0, 2] and all(r["dim"] == 64 and r["tokens"] > 0 for r in rows)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == sorted(Path(r["path"]).name for r in rows)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert main(args) == 0  # served from the cache: the files are not rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == mtimes


def test_stats_missing_corpus_file(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["stats", "--model", str(model_dir), "--layers", "0", "--corpus", str(tmp_path / "none.txt")]
    assert main([*args, "--out", str(tmp_path), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
