"""MisalignmentReport helpers: plot, to_dict, summary, quantiles and worst."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import eamet
from eamet import MisalignmentReport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> MisalignmentReport:
    """A report of partly aligned random data."""
    rng = np.random.default_rng(11)
    keys = rng.normal(size=(200, 12))
    residuals = keys @ rng.normal(size=(12, 9)) + rng.normal(size=(200, 9))
    return eamet.misalignment(keys, residuals, top_m=10)


def report_with_scores(scores: list[float]) -> MisalignmentReport:
    """A hand-built report with the given scores (other fields filled consistently)."""
    n = len(scores)
    return MisalignmentReport(
        scores=np.asarray(scores, dtype=np.float64),
        reverse_scores=np.zeros(n),
        overlap=np.ones(n),
        topm_mse=np.zeros(n),
        key_neighbors=np.zeros((n, 1), dtype=np.int64),
        neighbor_key_cos=np.ones((n, 1), dtype=np.float32),
        neighbor_residual_cos=np.ones((n, 1), dtype=np.float32),
        top_m=1,
        tau=0.07,
        progressive=False,
    )


@pytest.mark.parametrize("progressive", [False, True])
def test_plot_writes_a_png(tmp_path: Path, progressive: bool) -> None:
    """plot(path) draws the three panels into a PNG (magic bytes, > 10 kB), creating missing folders,
    also with the progressive support (row 0 has no neighbours)."""
    rng = np.random.default_rng(12)
    keys = rng.normal(size=(150, 6))
    rep = eamet.misalignment(keys, keys + rng.normal(size=(150, 6)), top_m=8, progressive=progressive)
    path = tmp_path / "figures" / "report.png"
    assert rep.plot(path) == path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_plot_of_a_perfectly_aligned_report(tmp_path: Path) -> None:
    """All scores zero (nothing positive to put on a log axis) still draws a figure."""
    x = np.random.default_rng(13).normal(size=(40, 5))
    rep = eamet.misalignment(x, 3.0 * x, top_m=4)
    assert rep.total < 1e-9
    path = rep.plot(str(tmp_path / "aligned.png"))
    assert Path(path).read_bytes().startswith(PNG_MAGIC)


def test_to_dict_is_json_ready(report: MisalignmentReport) -> None:
    """to_dict() survives json.dumps/loads; its total is report.total and its arrays are the report's."""
    d = json.loads(json.dumps(report.to_dict(worst=5)))
    assert d["total"] == report.total
    assert d["mean"] == report.mean
    assert (d["n"], d["top_m"], d["tau"], d["progressive"]) == (200, 10, 0.07, False)
    assert d["worst"] == report.worst(5)
    for name in ("scores", "reverse_scores", "overlap", "topm_mse"):
        np.testing.assert_array_equal(d[name], getattr(report, name))
    assert d["reverse_total"] == pytest.approx(report.reverse_scores.sum(), rel=1e-12)
    assert d["overlap_mean"] == pytest.approx(report.overlap.mean(), rel=1e-12)
    assert "key_neighbors" not in d


def test_summary_holds_scalars_only(report: MisalignmentReport) -> None:
    """summary() has sizes, settings and aggregates, no per-fact arrays."""
    s = report.summary()
    assert set(s) == {
        "n",
        "top_m",
        "tau",
        "progressive",
        "total",
        "mean",
        "quantiles",
        "reverse_total",
        "overlap_mean",
        "topm_mse_mean",
    }
    assert s["topm_mse_mean"] == pytest.approx(report.topm_mse.mean(), rel=1e-12)
    assert len(report) == s["n"] == 200


def test_quantiles(report: MisalignmentReport) -> None:
    """quantiles() is keyed p0 ... p100, monotone, from the minimum to the maximum score."""
    q = report.quantiles()
    assert list(q) == ["p0", "p25", "p50", "p75", "p90", "p99", "p100"]
    values = list(q.values())
    assert values == sorted(values)
    assert q["p0"] == report.scores.min() and q["p100"] == report.scores.max()
    assert q["p50"] == pytest.approx(float(np.median(report.scores)))
    assert report.quantiles((0.5, 0.125)) == {
        "p50": q["p50"],
        "p12.5": pytest.approx(np.quantile(report.scores, 0.125)),
    }


def test_worst_orders_by_score_then_index() -> None:
    """worst(k): largest scores first, ties to the smaller index; k = 0 is empty; k > N returns all."""
    rep = report_with_scores([1.0, 3.0, 0.5, 3.0, 2.0, 3.0, 0.0])
    assert rep.worst(4) == [1, 3, 5, 4]
    assert rep.worst(0) == []
    assert rep.worst(100) == [1, 3, 5, 4, 0, 2, 6]
    assert rep.worst() == rep.worst(100)  # default 10 > N
    assert all(isinstance(i, int) for i in rep.worst(3))


def test_worst_of_a_real_report(report: MisalignmentReport) -> None:
    """worst(k) lists the k largest scores in non-increasing order."""
    worst = report.worst(20)
    assert len(worst) == 20 and len(set(worst)) == 20
    assert np.all(np.diff(report.scores[worst]) <= 0)
    assert report.scores[worst[-1]] >= np.sort(report.scores)[-20]
