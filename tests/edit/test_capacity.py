"""The capacity report (``eamet.edit.capacity``, ``Editor.capacity``, ``eamet capacity``): leverage
h_i = k_iᵀ(λC + KᵀK)⁻¹k_i by the cheap SVD formula against the edit's own solve, its bounds and
monotonicity, the λ it offers, the forecast against the edit's own leverage, the file round trip, the
named errors and the command line."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import eamet
from eamet.app.cli import main
from eamet.base.errors import FactError, MissingDependencyError, NonFiniteError, ParameterError, ShapeError
from eamet.edit.capacity import BlockCapacity, CapacityReport, capacity_of
from eamet.edit.results import EditResult
from eamet.edit.solve import solve_layer
from editing_helpers import changed, flags, make_editor, small_config, small_facts, small_model, snapshot
from tiny import bpe_tokenizer, corpus, tiny_model

FORMAT1 = Path(__file__).resolve().parent.parent / "data" / "edit-format1.safetensors"


def _problem(n: int, d_ff: int, seed: int, samples: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """A moment C = XᵀX / m (SPD for m > d_ff, rank m otherwise) and N keys, float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, d_ff)) * rng.uniform(0.2, 3.0, d_ff)
    keys = rng.standard_normal((n, d_ff)) + 0.5 * rng.standard_normal(d_ff)  # a shared direction
    return torch.from_numpy(x.T @ x / samples), torch.from_numpy(keys)


def _direct(moment: torch.Tensor, keys: torch.Tensor, lam: float) -> np.ndarray:
    return np.asarray((solve_layer(moment, keys, lam) * keys).sum(1).numpy())


def _block(n: int, d_ff: int, lam: float, seed: int = 0, samples: int = 400) -> BlockCapacity:
    moment, keys = _problem(n, d_ff, seed, samples)
    return capacity_of({3: keys}, {3: moment}, {3: lam}, top_m=5, method="memit").blocks[0]


# -- the maths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d_ff"), [(12, 24), (40, 24), (24, 24)])
def test_svd_formula_equals_the_direct_solve_at_every_lambda(n: int, d_ff: int) -> None:
    moment, keys = _problem(n, d_ff, seed=n)
    block = capacity_of({0: keys}, {0: moment}, {0: 5.0}, top_m=3, method="memit").blocks[0]
    assert block.source == "svd"
    np.testing.assert_allclose(block.leverage, _direct(moment, keys, 5.0), rtol=1e-12)
    for lam in (1e-3, 0.1, 1.0, 37.0, 1e3, 1e6):
        np.testing.assert_allclose(block.leverage_at(lam), _direct(moment, keys, lam), rtol=1e-10, atol=0)
        assert block.mean_leverage_at(lam) == pytest.approx(_direct(moment, keys, lam).mean(), rel=1e-10)


def test_leverage_lies_in_0_1_and_the_trace_within_min_n_d() -> None:
    for n, d_ff in ((10, 24), (60, 24)):
        block = _block(n, d_ff, lam=0.5)
        for lam in (0.0, 0.5, 50.0):
            h = block.leverage_at(lam)
            assert h.shape == (n,) and h.dtype == np.float64
            assert (h >= 0).all() and (h <= 1 + 1e-12).all()
            assert h.sum() <= min(n, d_ff) + 1e-9
        assert block.trace == pytest.approx(block.leverage.sum()) and block.n == n
    # λ = 0 with more keys than dimensions: H is the projection onto the keys' span, tr(H) = d_ff.
    assert _block(60, 24, lam=0.5).leverage_at(0.0).sum() == pytest.approx(24, rel=1e-10)


def test_leverage_falls_as_lambda_grows_and_as_facts_are_added() -> None:
    moment, keys = _problem(48, 24, seed=7)
    block = capacity_of({0: keys}, {0: moment}, {0: 1.0}, top_m=5, method="memit").blocks[0]
    levels = np.stack([block.leverage_at(lam) for lam in (0.01, 0.1, 1.0, 10.0, 100.0)])
    assert (np.diff(levels, axis=0) < 0).all()
    means = [
        capacity_of({0: keys[:n]}, {0: moment}, {0: 1.0}, top_m=5, method="m").blocks[0] for n in (8, 24, 48)
    ]
    for fewer, more in itertools.pairwise(means):
        # Each fact's leverage can only drop when other facts compete for the directions.
        assert (more.leverage[: fewer.n] <= fewer.leverage + 1e-12).all()
        assert more.mean_leverage < fewer.mean_leverage


def test_lambda_for_is_the_largest_lambda_that_keeps_the_target() -> None:
    moment = _problem(30, 24, seed=3)[0]
    keys = {3: _problem(30, 24, seed=3)[1], 4: _problem(30, 24, seed=4)[1]}
    report = capacity_of(keys, {3: moment, 4: moment}, {3: 2.0, 4: 50.0}, top_m=4, method="memit")
    for target in (0.2, 0.5, 0.75):
        lams = report.lambda_for(target)
        assert len(lams) == 2
        for block, lam in zip(report.blocks, lams, strict=True):
            assert lam > 0
            assert _direct(moment, keys[block.layer], lam).mean() >= target - 1e-9  # the solve agrees
            assert block.mean_leverage_at(lam) >= target
            assert block.mean_leverage_at(lam * (1 + 1e-6)) < target
        moved = report.at(lams)
        assert moved.lambdas == lams and [b.layer for b in moved.blocks] == [3, 4]
        assert all(b.mean_leverage >= target for b in moved.blocks)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.1, float("nan"), True])
def test_lambda_for_refuses_a_target_outside_0_1(target: Any) -> None:
    with pytest.raises(ParameterError, match="target must lie in") as info:
        CapacityReport([_block(6, 8, 1.0)], 6, "memit", 5).lambda_for(target)
    assert info.value.argument == "mean_leverage"


def test_lambda_for_refuses_a_target_no_lambda_reaches() -> None:
    # 40 keys in 16 dimensions: at λ = 0 the mean leverage is 16/40 = 0.4, its supremum.
    block = _block(40, 16, lam=1.0)
    assert block.mean_leverage_at(0.0) == pytest.approx(0.4, rel=1e-10)
    with pytest.raises(ParameterError, match="no λ ≥ 0 reaches"):
        block.lambda_for(0.45)
    assert block.mean_leverage_at(block.lambda_for(0.35)) >= 0.35


def test_a_singular_c_falls_back_to_a_solve_per_lambda() -> None:
    # C of rank 8 in 16 dimensions; the keys fill its null space, so λC + KᵀK is PD for λ > 0.
    moment, keys = _problem(10, 16, seed=6, samples=8)
    block = capacity_of({2: keys}, {2: moment}, {2: 1.0}, top_m=3, method="memit").blocks[0]
    assert block.source == "solve"
    for lam in (0.3, 1.0, 300.0):
        np.testing.assert_allclose(block.leverage_at(lam), _direct(moment, keys, lam), rtol=1e-12)
    # The keys' part in C's null space is fitted whatever λ: the mean leverage never drops below it.
    # 8 of the 10 keys' directions lie in C's null space: tr(H) → 8 as λ grows.
    floor = 0.8
    assert floor < block.mean_leverage_at(1e5) < floor + 1e-4 < block.mean_leverage
    with pytest.raises(ParameterError, match=r"stays ≥ 0\.5 as λ grows"):
        block.lambda_for(0.5)
    target = (floor + block.mean_leverage) / 2
    lam = block.lambda_for(target)
    assert block.mean_leverage_at(lam) >= target > block.mean_leverage_at(lam * 1.001)


def test_top_cos_are_the_core_neighbour_cosines() -> None:
    moment, keys = _problem(9, 12, seed=2)
    block = capacity_of({0: keys}, {0: moment}, {0: 1.0}, top_m=4, method="memit").blocks[0]
    unit = keys / keys.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).numpy()
    np.fill_diagonal(cos, -np.inf)
    expected = -np.sort(-cos, axis=1)[:, :4]
    assert block.top_cos.shape == (9, 4) and block.top_cos.dtype == np.float32
    np.testing.assert_allclose(block.top_cos, expected, atol=1e-6)
    one = capacity_of({0: keys[:1]}, {0: moment}, {0: 1.0}, top_m=4, method="memit")
    assert one.blocks[0].top_cos.shape == (1, 0) and one.summary()["blocks"][0]["mean_top1_cos"] is None
    assert "—" in one.table()


def test_summary_table_and_json() -> None:
    moment, keys = _problem(20, 16, seed=1)
    report = capacity_of(
        {1: keys, 2: keys * 2}, {1: moment, 2: moment}, {1: 1.0, 2: 4.0}, top_m=3, method="eamet"
    )
    summary = report.summary()
    assert summary["facts"] == 20 and summary["method"] == "eamet" and summary["top_m"] == 3
    for row, block in zip(summary["blocks"], report.blocks, strict=True):
        assert row["layer"] == block.layer and row["lambda"] == block.lam
        assert row["trace_per_fact"] == pytest.approx(row["mean_leverage"])
        assert row["min_leverage"] <= row["median_leverage"] <= 1
        assert row["mean_topm_cos"] <= row["mean_top1_cos"]
    # 2K at 4λ is K at λ: the same leverage.
    np.testing.assert_allclose(report.blocks[1].leverage, report.blocks[0].at(1.0).leverage, rtol=1e-10)
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["blocks"][0]["leverage"]) == 20 and len(data["blocks"][0]["top1_cos"]) == 20
    lines = report.table().splitlines()
    assert len(lines) == 5 and lines[3].split()[0] == "1" and lines[4].split()[0] == "2"
    assert "M = 3 nearest" in lines[1]
    assert report.at(2.0).lambdas == (2.0, 2.0) and report.at([3.0, 5.0]).lambdas == (3.0, 5.0)
    with pytest.raises(ParameterError, match="one per block"):
        report.at([1.0, 2.0, 3.0])


def test_plot_writes_a_figure_and_names_the_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    moment, keys = _problem(20, 16, seed=1)
    report = capacity_of({1: keys, 2: keys}, {1: moment, 2: moment}, {1: 1.0, 2: 0.0}, top_m=3, method="m")
    out = report.plot(tmp_path / "sub" / "capacity.png")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r"eamet\[plot\]"):
        report.plot(tmp_path / "no.png")


# -- named errors ----------------------------------------------------------------------------------------


def test_bad_inputs_raise_named_errors() -> None:
    moment, keys = _problem(6, 8, seed=0)

    def run(k: Any = keys, c: Any = moment, lam: Any = 1.0, top_m: Any = 3, layers: Any = None) -> None:
        capacity_of(layers or {5: k}, {5: c}, {5: lam}, top_m=top_m, method="memit")

    bad = keys.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="block 5: key row 4") as nan_info:
        run(k=bad)
    assert nan_info.value.row == 4
    inf_c = moment.clone()
    inf_c[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="block 5: C"):
        run(c=inf_c)
    with pytest.raises(ShapeError, match=r"block 5: C has shape \(7, 7\)"):
        run(c=moment[:7, :7])
    with pytest.raises(ShapeError, match="must be"):
        run(k=keys[0])
    with pytest.raises(ShapeError, match="earlier blocks have 6"):
        capacity_of({5: keys, 6: keys[:4]}, {5: moment, 6: moment}, {5: 1.0, 6: 1.0}, top_m=3, method="m")
    for lam in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ParameterError, match="block 5: λ must be") as info:
            run(lam=lam)
        assert info.value.argument == "lambdas"
    with pytest.raises(ParameterError, match="no facts"):
        run(k=keys[:0])
    with pytest.raises(ParameterError, match="no blocks"):
        capacity_of({}, {}, {}, top_m=3, method="m")
    with pytest.raises(ParameterError, match="top_m"):
        run(top_m=0)
    with pytest.raises(ParameterError, match="block 5: no second moment C given"):
        capacity_of({5: keys}, {}, {5: 1.0}, top_m=3, method="m")
    with pytest.raises(ParameterError, match="block 5: no λ"):
        capacity_of({5: keys}, {5: moment}, {}, top_m=3, method="m")
    block = _block(6, 8, 1.0)
    with pytest.raises(ParameterError, match="λ must be"):
        block.leverage_at(-2.0)


# -- on a model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer(add_bos=False, vocab_size=256)


def test_editor_capacity_changes_nothing_and_falls_with_n(tok: Any, tmp_path: Path) -> None:
    model = small_model("llama")
    config = small_config(model, "memit")
    editor = make_editor(model, tok, config, tmp_path)
    before, flags_before = snapshot(model), flags(model)
    few = editor.capacity(small_facts(4), progress=False)
    many = editor.capacity(small_facts(12), progress=False)
    assert changed(model, before) == set() and flags(model) == flags_before
    assert few.layers == list(config.layers) and few.lambdas == config.mom2_update_weight
    assert few.facts == 4 and few.method == "memit" and few.top_m == config.top_m
    for a, b in zip(few.blocks, many.blocks, strict=True):
        assert a.leverage.shape == (4,) and b.leverage.shape == (12,) and b.top_cos.shape == (12, 11)
        assert ((a.leverage > 0) & (a.leverage < 1)).all()
        assert (b.leverage[:4] <= a.leverage + 1e-9).all()
    with pytest.raises(FactError, match="no facts"):
        editor.capacity([], progress=False)


def test_forecast_equals_the_edits_own_leverage_and_survives_save_load(tok: Any, tmp_path: Path) -> None:
    model = small_model("gpt2")
    config = small_config(model, "memit", layers=(1,), mom2_update_weight=(50.0,))
    editor = make_editor(model, tok, config, tmp_path / "stats")
    facts = small_facts(6)
    forecast = editor.capacity(facts, progress=False)
    result = editor.edit(facts, progress=False)
    after = CapacityReport.of_result(result)
    assert after.layers == [1] and after.blocks[0].source == "edit" and after.blocks[0].lam == 50.0
    # One block: the solve's keys are the forecast's (the unedited model), so only float32 noise differs.
    np.testing.assert_allclose(after.blocks[0].leverage, forecast.blocks[0].leverage, atol=1e-5)
    np.testing.assert_allclose(after.blocks[0].top_cos, forecast.blocks[0].top_cos, atol=1e-5)
    assert result.summary()["mean_leverage"] == {1: pytest.approx(forecast.blocks[0].mean_leverage, abs=1e-5)}
    with pytest.raises(ParameterError, match="edit result"):
        after.at(10.0)
    path = tmp_path / "edit.safetensors"
    result.save(path)
    loaded = EditResult.load(path)
    assert torch.equal(loaded.updates[0].leverage, result.updates[0].leverage)
    again = CapacityReport.of_result(loaded)
    np.testing.assert_array_equal(again.blocks[0].leverage, after.blocks[0].leverage)
    assert again.blocks[0].top_cos.shape == (6, 0)  # the keys are not saved


def test_a_file_without_leverage_still_loads() -> None:
    with pytest.warns(UserWarning, match="format 1"):
        old = EditResult.load(FORMAT1)
    assert all(u.leverage.numel() == 0 for u in old.updates)
    assert old.summary()["mean_leverage"] == {}
    with pytest.raises(ParameterError, match="records no leverage"):
        CapacityReport.of_result(old)


def test_capacity_report_is_exported_lazily() -> None:
    assert eamet.CapacityReport is CapacityReport and "CapacityReport" in eamet.__all__


# -- the command -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    tiny_model("llama", vocab_size=256, n_layer=4, hidden=32, ffn=64).save_pretrained(root)
    bpe_tokenizer(add_bos=False).save_pretrained(root)
    (root / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    lines = [
        json.dumps({"prompt": f.prompt, "subject": f.subject, "target": f.target}) for f in small_facts(8)
    ]
    (root / "facts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _args(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "capacity",
        "--model",
        str(model_dir),
        "--facts",
        str(model_dir / "facts.jsonl"),
        "--corpus",
        str(model_dir / "corpus.txt"),
        "--samples",
        "100",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        *extra,
    ]


def test_capacity_command_prints_writes_json_and_plot(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    extra = ("--method", "memit", "--layers", "1,2", "--mom2-update-weight", "20,40", "--lambda-for", "0.5")
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(_args(model_dir, tmp_path, *extra, "--json", str(out_json), "--plot", str(out_png))) == 0
    printed = capsys.readouterr().out
    assert "capacity of 8 facts (memit)" in printed and "(eamet's own rule)" in printed
    data = json.loads(out_json.read_text())
    assert data["command"] == "capacity" and data["facts"] == 8
    assert [b["layer"] for b in data["blocks"]] == [1, 2] and [b["lambda"] for b in data["blocks"]] == [
        20,
        40,
    ]
    assert all(len(b["leverage"]) == 8 and 0 < b["mean_leverage"] < 1 for b in data["blocks"])
    suggested = data["lambda_for"]
    assert suggested["target"] == 0.5 and len(suggested["lambdas"]) == 2
    assert all(b["mean_leverage"] >= 0.5 for b in suggested["report"]["blocks"])
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_capacity_command_one_lambda_for_every_block(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    assert main(_args(model_dir, tmp_path, "--mom2-update-weight", "30", "--json", str(out))) == 0
    assert [b["lambda"] for b in json.loads(out.read_text())["blocks"]] == [30.0, 30.0]


def test_capacity_command_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (("--lambda-for", "1.5"), ("--mom2-update-weight", "a"), ("--mom2-update-weight", "-1")):
        with pytest.raises(SystemExit) as exc:
            main(_args(model_dir, tmp_path, *bad))
        assert exc.value.code == 2
    assert main(_args(model_dir, tmp_path, "--layers", "1,2", "--mom2-update-weight", "1,2,3")) == 1
    assert "mom2_update_weight needs one finite λ >= 0 per layer (2)" in capsys.readouterr().err
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert main(["capacity", "--model", str(tmp_path / "no-model"), "--facts", str(empty)]) == 1
    assert "no facts" in capsys.readouterr().err
