"""The terms of the residual objective (algorithm.md §4.3), as pure torch functions.

Each is differentiable in ``delta`` (and, for the NLL and essence terms, in the log-probabilities) and
checked with ``torch.autograd.gradcheck`` in float64 in the tests.
"""

from __future__ import annotations

import torch
from torch.nn import functional

__all__ = ["alignment_kl", "essence_kl", "norm_penalty", "residual_cosines", "target_nll", "topm_mse"]


def target_nll(log_probs: torch.Tensor, target_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Prefix-augmented NLL (§4.3a): mean over sequences of the per-token mean NLL of the target.

    Args:
        log_probs: (B, T, V) log-softmax of the logits.
        target_ids: (Ty,) int64 target token ids.
        positions: (B, Ty) int64; ``log_probs[b, positions[b, t]]`` predicts ``target_ids[t]``.

    Returns:
        Scalar: -(1/B) Σ_b (1/Ty) Σ_t log P(y_t | ...).
    """
    rows = torch.arange(log_probs.shape[0], device=log_probs.device)[:, None]
    picked = log_probs[rows, positions, target_ids[None, :].expand_as(positions)]
    return -picked.mean(dim=1).mean()


def essence_kl(log_p: torch.Tensor, log_p0: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ P₀) = Σ_v P(v)(log P(v) − log P₀(v)) between two (V,) log-distributions (§4.3b).

    The direction is the reference's: the current distribution is the first argument.
    """
    return (log_p.exp() * (log_p - log_p0)).sum()


def residual_cosines(delta: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """(J,) cosines between ``delta`` (d,) and each row of ``saved`` (J, d)."""
    return functional.cosine_similarity(delta[None, :], saved, dim=-1)


def alignment_kl(
    delta: torch.Tensor, saved: torch.Tensor, key_cos: torch.Tensor, tau: float, eps: float = 1e-8
) -> torch.Tensor:
    """KL(P_k ‖ P_r) over the earlier facts (§4.3d).

    Args:
        delta: (d,) the residual being optimised.
        saved: (J, d) the residuals of the J earlier facts (constants).
        key_cos: (J,) cosines between this fact's key and theirs (constants).
        tau: temperature; eps: the reference's smoothing inside the log.

    Returns:
        Scalar Σ_j p_j log((p_j + ε)/(q_j + ε)), p = softmax(key_cos/τ), q = softmax(cos(δ, saved)/τ).
    """
    p = torch.softmax(key_cos / tau, dim=0)
    q = torch.softmax(residual_cosines(delta, saved) / tau, dim=0)
    return (p * torch.log((p + eps) / (q + eps))).sum()


def topm_mse(
    delta: torch.Tensor, saved_top: torch.Tensor, key_cos_top: torch.Tensor, tau: float
) -> torch.Tensor:
    """Weighted MSE between key and residual cosines over the top-M key neighbours (§4.3e).

    Args:
        delta: (d,); saved_top: (M, d) the neighbours' saved residuals; key_cos_top: (M,) their key cosines.

    Returns:
        Scalar Σ_j w_j (s^k_j − s^r_j)², w = softmax(key_cos_top/τ) renormalised over the M neighbours.
    """
    w = torch.softmax(key_cos_top / tau, dim=0)
    return (w * (key_cos_top - residual_cosines(delta, saved_top)) ** 2).sum()


def norm_penalty(
    delta: torch.Tensor, kind: str, factor: float, *, h_norm: float, key_radius: float
) -> torch.Tensor:
    """The norm regulariser R(δ) (§4.3c).

    ``fix_ks``: factor·(‖δ‖ − key_radius)²; ``norm``: factor·‖δ‖/‖h‖; ``squared_norm`` (MEMIT):
    factor·‖δ‖/‖h‖²; ``none``: 0.
    """
    if kind == "none" or factor == 0:
        return delta.new_zeros(())
    norm = torch.linalg.vector_norm(delta)
    if kind == "fix_ks":
        penalty: torch.Tensor = factor * (norm - key_radius) ** 2
    elif kind == "norm":
        penalty = factor * norm / h_norm
    elif kind == "squared_norm":
        penalty = factor * norm / h_norm**2
    else:
        raise ValueError(f"unknown norm penalty {kind!r}")
    return penalty
