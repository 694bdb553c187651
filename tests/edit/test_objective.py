"""The residual objective's terms (``eamet.edit.objective``, algorithm.md §4.3): gradients (float64
gradcheck), values on hand-computed examples, the reference's ``kl_div`` call, and agreement with the Rust
misalignment report (``eamet.misalignment(..., progressive=True)``), whose ``reverse_scores`` and ``topm_mse``
are the same quantities measured after the fact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.nn import functional

import eamet
from eamet.edit.objective import (
    alignment_kl_rows,
    essence_kl,
    norm_penalty,
    residual_cosines_rows,
    target_nll,
    topm_mse_rows,
)

TAU = 0.07


# The reference's per-fact view of the alignment terms: one fact (B = 1), every earlier fact in its support.
def residual_cosines(delta: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    return residual_cosines_rows(delta[None, :], saved)[0]


def alignment_kl(
    delta: torch.Tensor, saved: torch.Tensor, key_cos: torch.Tensor, tau: float, eps: float = 1e-8
) -> torch.Tensor:
    valid = torch.ones((1, saved.shape[0]), dtype=torch.bool)
    return alignment_kl_rows(delta[None, :], saved, key_cos[None, :], valid, tau, eps)[0]


def topm_mse(
    delta: torch.Tensor, saved_top: torch.Tensor, key_cos_top: torch.Tensor, tau: float
) -> torch.Tensor:
    valid = torch.ones((1, saved_top.shape[0]), dtype=torch.bool)
    return topm_mse_rows(delta[None, :], saved_top[None], key_cos_top[None, :], valid, tau)[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)
    return x.requires_grad_(requires_grad)


def _log_softmax(*shape: int, seed: int) -> torch.Tensor:
    return torch.log_softmax(_randn(*shape, seed=seed), dim=-1)


# -- gradients --------------------------------------------------------------------------------------------


def test_target_nll_gradcheck() -> None:
    # B = 2 facts × 2 templates, targets of 3 and 2 tokens (the second padded), V = 7.
    log_probs = _log_softmax(4, 3, 7, seed=1).requires_grad_(True)
    target = torch.tensor([[4, 0, 6], [2, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert gradcheck(lambda lp: target_nll(lp, target, mask, 2), (log_probs,))


def test_target_nll_gradcheck_through_log_softmax() -> None:
    # The optimiser differentiates through log_softmax of the logits; the chain must hold too.
    logits = _randn(3, 2, 6, seed=2, requires_grad=True)
    target = torch.tensor([[5, 1], [3, 0], [2, 2]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    assert gradcheck(lambda x: target_nll(torch.log_softmax(x, -1), target, mask, 1), (logits,))


def test_essence_kl_gradcheck_in_both_arguments() -> None:
    log_p = _log_softmax(9, seed=3).requires_grad_(True)
    log_p0 = _log_softmax(9, seed=4).requires_grad_(True)
    assert gradcheck(essence_kl, (log_p, log_p0))
    logits = _randn(9, seed=5, requires_grad=True)
    assert gradcheck(lambda x: essence_kl(torch.log_softmax(x, 0), log_p0.detach()), (logits,))


def test_residual_cosines_gradcheck() -> None:
    delta = _randn(6, seed=6, requires_grad=True)
    saved = _randn(4, 6, seed=7, requires_grad=True)
    assert gradcheck(residual_cosines, (delta, saved))


@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("tau", [TAU, 1.0])
def test_alignment_kl_gradcheck(tau: float, eps: float) -> None:
    delta = _randn(8, seed=8, requires_grad=True)
    saved = _randn(5, 8, seed=9)
    key_cos = torch.tanh(_randn(5, seed=10))
    assert gradcheck(lambda d: alignment_kl(d, saved, key_cos, tau, eps), (delta,))


@pytest.mark.parametrize("tau", [TAU, 1.0])
def test_topm_mse_gradcheck(tau: float) -> None:
    delta = _randn(8, seed=11, requires_grad=True)
    saved = _randn(4, 8, seed=12)
    key_cos = torch.tanh(_randn(4, seed=13))
    assert gradcheck(lambda d: topm_mse(d, saved, key_cos, tau), (delta,))


def test_alignment_rows_gradcheck_with_supports_of_their_own() -> None:
    # The optimiser's form: B = 3 facts, each against its own subset of J = 4 candidates (fact 0 has none).
    deltas = _randn(3, 5, seed=40, requires_grad=True)
    saved = _randn(4, 5, seed=41)
    key_cos = torch.tanh(_randn(3, 4, seed=42))
    valid = torch.tensor([[False] * 4, [True, True, False, False], [True, False, True, True]])
    assert gradcheck(lambda d: alignment_kl_rows(d, saved, key_cos, valid, TAU, 1e-8), (deltas,))
    top = _randn(3, 2, 5, seed=43)
    top_valid = torch.tensor([[False, False], [True, False], [True, True]])
    assert gradcheck(lambda d: topm_mse_rows(d, top, key_cos[:, :2], top_valid, TAU), (deltas,))
    rows = alignment_kl_rows(deltas, saved, key_cos, valid, TAU, 1e-8)
    assert rows[0].item() == 0.0
    alone = alignment_kl(deltas[2], saved[valid[2]], key_cos[2, valid[2]], TAU)
    torch.testing.assert_close(rows[2], alone)


@pytest.mark.parametrize("kind", ["fix_ks", "norm", "squared_norm"])
def test_norm_penalty_gradcheck(kind: str) -> None:
    delta = _randn(7, seed=14, requires_grad=True)
    assert gradcheck(lambda d: norm_penalty(d, kind, 0.3, h_norm=2.5, key_radius=1.7), (delta,))


# -- values -----------------------------------------------------------------------------------------------


def test_target_nll_hand_computed() -> None:
    # One fact, 2 templates (sequences), target [2, 0]: each sequence's log-probs at the two predicting
    # positions, V = 3.
    probs = torch.tensor(
        [
            [[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]],
            [[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]],
        ],
        dtype=torch.float64,
    )
    seq0 = (math.log(0.7) + math.log(0.5)) / 2
    seq1 = (math.log(0.8) + math.log(0.9)) / 2
    expected = -(seq0 + seq1) / 2
    nll = target_nll(probs.log(), torch.tensor([[2, 0]]), torch.tensor([[1, 1]]), 2)
    assert nll.shape == (1,)
    assert nll.item() == pytest.approx(expected, rel=1e-14)


def test_target_nll_ignores_padding_and_keeps_facts_apart() -> None:
    # Two facts, one template each: fact 0's target has 3 tokens, fact 1's one token padded to 3; whatever
    # sits at fact 1's padded positions must not count.
    log_probs = _log_softmax(2, 3, 5, seed=15)
    target = torch.tensor([[1, 4, 2], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    nll = target_nll(log_probs, target, mask, 1)
    fact0 = -sum(log_probs[0, t, int(target[0, t])].item() for t in range(3)) / 3
    assert nll[0].item() == pytest.approx(fact0, rel=1e-14)
    assert nll[1].item() == pytest.approx(-log_probs[1, 0, 3].item(), rel=1e-14)
    changed = log_probs.clone()
    changed[1, 1:] = _log_softmax(2, 5, seed=16)
    assert torch.equal(target_nll(changed, target, mask, 1), nll)


def test_essence_kl_matches_reference_kl_div() -> None:
    for seed in range(5):
        log_p = _log_softmax(11, seed=100 + seed)
        log_p0 = _log_softmax(11, seed=200 + seed)
        # The reference: kl_div(log_p0, log_p, log_target=True, reduction="sum") = KL(P || P0).
        reference = functional.kl_div(log_p0, log_p, log_target=True, reduction="sum")
        ours = essence_kl(log_p, log_p0)
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-15)
        assert ours.item() > 0


def test_essence_kl_is_not_symmetric_and_zero_at_equality() -> None:
    log_p = _log_softmax(6, seed=16)
    log_p0 = _log_softmax(6, seed=17)
    assert essence_kl(log_p, log_p).item() == 0.0
    # The direction matters (the current distribution first): both orders differ on generic inputs.
    assert abs(essence_kl(log_p, log_p0).item() - essence_kl(log_p0, log_p).item()) > 1e-6


def test_residual_cosines_values() -> None:
    delta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    saved = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.0, -1.0, 1 / math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(residual_cosines(delta, saved), expected)


def test_alignment_kl_definition_and_zero_at_alignment() -> None:
    delta = _randn(5, seed=18)
    saved = _randn(4, 5, seed=19)
    key_cos = torch.tanh(_randn(4, seed=20))
    p = torch.softmax(key_cos / TAU, 0)
    q = torch.softmax(residual_cosines(delta, saved) / TAU, 0)
    expected = (p * (p / q).log()).sum()
    torch.testing.assert_close(alignment_kl(delta, saved, key_cos, TAU, eps=0.0), expected)
    # The default eps only smooths: where no probability is tiny (tau = 1), the value moves by ~eps.
    p1, q1 = torch.softmax(key_cos, 0), torch.softmax(residual_cosines(delta, saved), 0)
    smooth = alignment_kl(delta, saved, key_cos, 1.0).item()
    assert smooth == pytest.approx((p1 * (p1 / q1).log()).sum().item(), abs=1e-6)
    assert smooth != alignment_kl(delta, saved, key_cos, 1.0, eps=0.0).item()
    # Residual cosines equal to key cosines: KL = 0.
    aligned = alignment_kl(delta, saved, residual_cosines(delta, saved), TAU, eps=0.0)
    assert aligned.item() == pytest.approx(0.0, abs=1e-12)
    assert alignment_kl(delta, saved, key_cos, TAU, eps=0.0).item() > 0


def test_topm_mse_definition() -> None:
    delta = _randn(5, seed=21)
    saved = _randn(3, 5, seed=22)
    key_cos = torch.tensor([0.9, 0.5, -0.2], dtype=torch.float64)
    w = torch.softmax(key_cos / TAU, 0)
    expected = (w * (key_cos - residual_cosines(delta, saved)) ** 2).sum()
    torch.testing.assert_close(topm_mse(delta, saved, key_cos, TAU), expected)
    assert topm_mse(delta, saved, residual_cosines(delta, saved), TAU).item() == pytest.approx(0, abs=1e-15)


# -- against the Rust misalignment report -----------------------------------------------------------------


def _cosines(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit @ unit.T


@pytest.mark.parametrize("tau", [TAU, 0.5])
def test_alignment_kl_equals_progressive_report_reverse_scores(tau: float) -> None:
    rng = np.random.default_rng(7)
    n, f, d = 48, 24, 16
    keys, residuals = rng.standard_normal((n, f)), rng.standard_normal((n, d))
    report = eamet.misalignment(keys, residuals, tau=tau, top_m=5, progressive=True)
    key_cos = torch.from_numpy(_cosines(keys))
    r = torch.from_numpy(residuals)
    ours = [alignment_kl(r[i], r[:i], key_cos[i, :i], tau, eps=0.0).item() if i else 0.0 for i in range(n)]
    assert report.reverse_scores[0] == 0.0
    # The report works on float32 products: cosines off by ~1e-7, logits by ~1e-7/tau; the loss is float64.
    np.testing.assert_allclose(ours, report.reverse_scores, rtol=1e-5, atol=4e-7 / tau)
    assert min(ours[2:]) > 0


def test_alignment_kl_with_one_earlier_fact_is_zero() -> None:
    # A softmax over one element is 1 whatever the cosines: nothing to align (row 1 of the report).
    delta, saved = _randn(4, seed=23), _randn(1, 4, seed=24)
    assert alignment_kl(delta, saved, torch.tensor([0.3], dtype=torch.float64), TAU).item() == 0.0


@pytest.mark.parametrize("top_m", [1, 5, 100])
def test_topm_mse_equals_progressive_report(top_m: int) -> None:
    # Same definition as the report's topm_mse: neighbours = the top-M earlier facts by key cosine, weights
    # softmax(key cosine / tau) renormalised over them. The neighbour choice is made here independently.
    rng = np.random.default_rng(8)
    n, f, d = 40, 20, 12
    keys, residuals = rng.standard_normal((n, f)), rng.standard_normal((n, d))
    report = eamet.misalignment(keys, residuals, tau=TAU, top_m=top_m, progressive=True)
    key_cos = _cosines(keys)
    r = torch.from_numpy(residuals)
    ours = [0.0]
    for i in range(1, n):
        top = np.argsort(-key_cos[i, :i], kind="stable")[: min(top_m, i)]
        np.testing.assert_array_equal(report.key_neighbors[i, : len(top)], top)
        kc = torch.from_numpy(key_cos[i, top])
        ours.append(topm_mse(r[i], r[top], kc, TAU).item())
    assert report.topm_mse[0] == 0.0
    np.testing.assert_allclose(ours, report.topm_mse, rtol=1e-5, atol=1e-9)


# -- norm penalty -----------------------------------------------------------------------------------------


def test_norm_penalty_each_kind() -> None:
    delta = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    kw = {"h_norm": 2.0, "key_radius": 1.5}
    assert norm_penalty(delta, "fix_ks", 0.5, **kw).item() == pytest.approx(0.5 * (5 - 1.5) ** 2)
    assert norm_penalty(delta, "norm", 0.5, **kw).item() == pytest.approx(0.5 * 5 / 2.0)
    assert norm_penalty(delta, "squared_norm", 0.5, **kw).item() == pytest.approx(0.5 * 5 / 4.0)
    for kind in ("none", "fix_ks", "norm", "squared_norm"):
        zero = norm_penalty(delta, kind, 0.0, **kw)
        assert zero.item() == 0.0 and zero.shape == () and zero.dtype == torch.float64
    assert norm_penalty(delta, "none", 3.0, **kw).item() == 0.0
    # fix_ks pulls the norm towards the radius: zero there, from both sides.
    on_radius = delta / 5 * 1.5
    assert norm_penalty(on_radius, "fix_ks", 2.0, **kw).item() == pytest.approx(0.0, abs=1e-24)
    assert norm_penalty(delta / 5, "fix_ks", 2.0, **kw).item() == pytest.approx(2.0 * 0.5**2)


def test_norm_penalty_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown norm penalty"):
        norm_penalty(torch.ones(3), "l1", 1.0, h_norm=1.0, key_radius=1.0)
