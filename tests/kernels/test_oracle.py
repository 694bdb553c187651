"""Tests of the test oracle itself: it reproduces a hand-computed example, and its checker rejects
reports that are wrong by more than rounding."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import eamet
from oracle import assert_matches_oracle, misalignment_oracle

H = 1 / math.sqrt(2)


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) of two small distributions."""
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def softmax(values: list[float], tau: float) -> list[float]:
    """softmax(values / tau)."""
    e = [math.exp(v / tau) for v in values]
    return [x / sum(e) for x in e]


def test_oracle_on_a_hand_computed_example() -> None:
    """Three 2-D facts whose cosines are 0 and 1/sqrt(2), worked out by hand."""
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cos: (0,1)=0, (0,2)=h, (1,2)=h
    residuals = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # cos: (0,1)=h, (0,2)=0, (1,2)=h
    tau = 0.5
    o = misalignment_oracle(keys, residuals, tau=tau, top_m=1)
    # row 0: support {1, 2}; key cosines (0, h), residual cosines (h, 0)
    pk, pr = softmax([0.0, H], tau), softmax([H, 0.0], tau)
    assert o.scores[0] == pytest.approx(kl(pr, pk), rel=1e-12)
    assert o.reverse_scores[0] == pytest.approx(kl(pk, pr), rel=1e-12)
    assert o.keys.indices[0].tolist() == [2] and o.residuals.indices[0].tolist() == [1]
    assert o.overlap[0] == 0.0
    assert o.topm_mse[0] == pytest.approx((H - 0.0) ** 2, rel=1e-12)  # one neighbour: weight 1
    # row 2: key cosines (h, h) tie -> smaller index 0 wins; residual cosines (0, h) -> 1
    assert o.keys.indices[2].tolist() == [0] and o.residuals.indices[2].tolist() == [1]
    assert o.keys.boundary_gap[2] == 0.0
    # progressive: row 0 is empty, row 1 has the single support {0}: KL of one-point distributions is 0
    p = misalignment_oracle(keys, residuals, tau=tau, top_m=2, progressive=True)
    assert p.keys.indices[0].tolist() == [-1, -1] and p.keys.indices[1].tolist() == [0, -1]
    assert (p.scores[0], p.overlap[0], p.scores[1]) == (0.0, 1.0, 0.0)
    assert p.scores[2] == pytest.approx(kl(softmax([H, 0.0], tau), softmax([H, H], tau)), rel=1e-12)


def perturbed(raw: dict[str, Any], name: str, change: Any) -> dict[str, Any]:
    """A copy of a raw report with one field changed by ``change(copy_of_field)``."""
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in raw.items()}
    change(out[name])
    return out


def test_checker_rejects_wrong_reports() -> None:
    """assert_matches_oracle fails on a score off by 1e-3, swapped or wrong neighbours, a wrong overlap
    or MSE, and on the other support's report."""
    rng = np.random.default_rng(9)
    keys = rng.normal(size=(60, 6))
    residuals = keys @ rng.normal(size=(6, 6)) + rng.normal(size=(60, 6))
    raw = eamet._core.misalignment(keys, residuals, tau=0.07, top_m=5, progressive=False)
    oracle = misalignment_oracle(keys, residuals, top_m=5)
    assert_matches_oracle(raw, oracle)
    det = int(np.flatnonzero(oracle.keys.order_gap > 1e-3)[0])

    def bump_score(a: np.ndarray) -> None:
        a[7] += 1e-3

    def swap_neighbors(a: np.ndarray) -> None:
        a[det, [0, 1]] = a[det, [1, 0]]

    def self_neighbor(a: np.ndarray) -> None:
        a[det, 4] = det

    def bump_overlap(a: np.ndarray) -> None:
        a[det] = 1.0 if a[det] < 1 else 0.8

    def bump_mse(a: np.ndarray) -> None:
        a[det] += 1e-3

    def bump_residual_cos(a: np.ndarray) -> None:
        a[det, 2] += 1e-3

    for name, change in [
        ("scores", bump_score),
        ("reverse_scores", bump_score),
        ("key_neighbors", swap_neighbors),
        ("key_neighbors", self_neighbor),
        ("overlap", bump_overlap),
        ("topm_mse", bump_mse),
        ("neighbor_residual_cos", bump_residual_cos),
    ]:
        with pytest.raises(AssertionError):
            assert_matches_oracle(perturbed(raw, name, change), oracle)
    progressive = eamet._core.misalignment(keys, residuals, tau=0.07, top_m=5, progressive=True)
    with pytest.raises(AssertionError):
        assert_matches_oracle(progressive, oracle)
