"""The terms of the residual objective (algorithm.md §4.3), as pure torch functions.

Each is differentiable in ``delta`` (and, for the NLL and essence terms, in the log-probabilities) and
checked with ``torch.autograd.gradcheck`` in float64 in the tests. The alignment terms come in two
forms: one fact against its earlier facts (``alignment_kl``, ``topm_mse``: the reference's per-fact view),
and a batch of B facts at once, each against its own subset of the saved residuals (``alignment_kl_rows``,
``topm_mse_rows``), which the single forms call with B = 1.
"""

from __future__ import annotations

import torch

__all__ = [
    "alignment_kl",
    "alignment_kl_rows",
    "essence_kl",
    "norm_penalty",
    "residual_cosines",
    "residual_cosines_rows",
    "target_nll",
    "topm_mse",
    "topm_mse_rows",
]

# Norms below this are treated as this when forming cosines (a zero residual has cosine 0 to everything).
_NORM_FLOOR = 1e-8


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
    """KL(P ‖ P₀) = Σ_v P(v)(log P(v) − log P₀(v)) over the last dimension (§4.3b).

    Args:
        log_p, log_p0: (..., V) log-distributions (one per fact for a batch).

    Returns:
        (...) the divergence of each distribution: a scalar for (V,) inputs. The direction is the
        reference's: the current distribution is the first argument.
    """
    kl: torch.Tensor = (log_p.exp() * (log_p - log_p0)).sum(dim=-1)
    return kl


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    unit: torch.Tensor = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_NORM_FLOOR)
    return unit


def residual_cosines_rows(deltas: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """(B, J) cosines between each row of ``deltas`` (B, d) and each row of ``saved`` (J, d), as one
    product of unit rows (never a B × J × d tensor)."""
    cosines: torch.Tensor = _unit_rows(deltas) @ _unit_rows(saved).T
    return cosines


def residual_cosines(delta: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """(J,) cosines between ``delta`` (d,) and each row of ``saved`` (J, d)."""
    return residual_cosines_rows(delta[None, :], saved)[0]


def alignment_kl_rows(
    deltas: torch.Tensor,
    saved: torch.Tensor,
    key_cos: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
    eps: float = 1e-8,
) -> torch.Tensor:
    """KL(P_k ‖ P_r) of each of B facts over its own subset of the saved residuals (§4.3d).

    Args:
        deltas: (B, d) the residuals being optimised.
        saved: (J, d) candidate residuals (constants).
        key_cos: (B, J) cosines between each fact's key and the candidates' keys (constants).
        valid: (B, J) bool, which candidates belong to each fact's support (its earlier facts).
        tau: temperature; eps: the reference's smoothing inside the log.

    Returns:
        (B,) Σ_j p_j log((p_j + ε)/(q_j + ε)) over the valid j, with p = softmax(key_cos/τ) and
        q = softmax(cos(δ, saved)/τ) each taken over the valid j; 0 for a fact with no valid candidate.
    """
    out = deltas.new_zeros(deltas.shape[0])
    has = valid.any(dim=1)
    if not bool(has.any()):
        return out
    mask = valid[has]
    p = torch.softmax((key_cos[has] / tau).masked_fill(~mask, float("-inf")), dim=1)
    q_logits = residual_cosines_rows(deltas[has], saved) / tau
    q = torch.softmax(q_logits.masked_fill(~mask, float("-inf")), dim=1)
    terms = (p * torch.log((p + eps) / (q + eps))).masked_fill(~mask, 0.0)
    return out.index_put((has.nonzero()[:, 0],), terms.sum(dim=1))


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
    valid = torch.ones((1, saved.shape[0]), dtype=torch.bool, device=delta.device)
    return alignment_kl_rows(delta[None, :], saved, key_cos[None, :], valid, tau, eps)[0]


def topm_mse_rows(
    deltas: torch.Tensor, saved_top: torch.Tensor, key_cos_top: torch.Tensor, valid: torch.Tensor, tau: float
) -> torch.Tensor:
    """Weighted MSE between key and residual cosines over each fact's top-M key neighbours (§4.3e).

    Args:
        deltas: (B, d); saved_top: (B, M, d) each fact's neighbours' residuals; key_cos_top: (B, M) their
            key cosines; valid: (B, M) bool, which of the M slots hold a neighbour (a fact with fewer than
            M earlier facts has padding).

    Returns:
        (B,) Σ_j w_j (s^k_j − s^r_j)² over the valid slots, w = softmax(key_cos_top/τ) renormalised over
        them; 0 for a fact with no neighbour.
    """
    out = deltas.new_zeros(deltas.shape[0])
    has = valid.any(dim=1)
    if not bool(has.any()):
        return out
    mask = valid[has]
    w = torch.softmax((key_cos_top[has] / tau).masked_fill(~mask, float("-inf")), dim=1)
    res_cos = torch.einsum("bd,bmd->bm", _unit_rows(deltas[has]), _unit_rows(saved_top[has]))
    terms = (w * (key_cos_top[has] - res_cos) ** 2).masked_fill(~mask, 0.0)
    return out.index_put((has.nonzero()[:, 0],), terms.sum(dim=1))


def topm_mse(
    delta: torch.Tensor, saved_top: torch.Tensor, key_cos_top: torch.Tensor, tau: float
) -> torch.Tensor:
    """Weighted MSE between key and residual cosines over the top-M key neighbours (§4.3e).

    Args:
        delta: (d,); saved_top: (M, d) the neighbours' saved residuals; key_cos_top: (M,) their key cosines.

    Returns:
        Scalar Σ_j w_j (s^k_j − s^r_j)², w = softmax(key_cos_top/τ) renormalised over the M neighbours.
    """
    valid = torch.ones((1, saved_top.shape[0]), dtype=torch.bool, device=delta.device)
    return topm_mse_rows(delta[None, :], saved_top[None], key_cos_top[None, :], valid, tau)[0]


def norm_penalty(
    delta: torch.Tensor,
    kind: str,
    factor: float,
    *,
    h_norm: float | torch.Tensor,
    key_radius: float | torch.Tensor,
) -> torch.Tensor:
    """The norm regulariser R(δ) (§4.3c) of one residual (d,) or of each row of (B, d) residuals.

    ``fix_ks``: factor·(‖δ‖ − key_radius)²; ``norm``: factor·‖δ‖/‖h‖; ``squared_norm`` (MEMIT):
    factor·‖δ‖/‖h‖²; ``none``: 0. ``h_norm`` and ``key_radius`` are scalars or (B,) tensors.

    Returns:
        A scalar for (d,) input, (B,) for (B, d).
    """
    if kind not in ("none", "fix_ks", "norm", "squared_norm"):
        raise ValueError(f"unknown norm penalty {kind!r}")
    norm = torch.linalg.vector_norm(delta, dim=-1)
    if kind == "none" or factor == 0:
        return torch.zeros_like(norm)
    if kind == "fix_ks":
        penalty: torch.Tensor = factor * (norm - key_radius) ** 2
    elif kind == "norm":
        penalty = factor * norm / h_norm
    else:
        penalty = factor * norm / h_norm**2
    return penalty
