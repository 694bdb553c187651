"""The terms of the residual objective (algorithm.md §4.3), as pure torch functions.

Each is differentiable in ``delta`` (and, for the NLL and essence terms, in the log-probabilities) and
checked with ``torch.autograd.gradcheck`` in float64 in the tests. The alignment terms take a batch of B
facts at once, each against its own subset of the saved residuals (``alignment_kl_rows``,
``topm_mse_rows``); the reference's per-fact view is B = 1 with every earlier fact valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eamet.base.settings import EditConfig

__all__ = [
    "Alignment",
    "LossTerms",
    "alignment_kl_rows",
    "essence_kl",
    "norm_penalty",
    "residual_cosines_rows",
    "target_nll",
    "topm_mse_rows",
]

# Norms below this are treated as this when forming cosines (a zero residual has cosine 0 to everything).
_NORM_FLOOR = 1e-8


def target_nll(
    log_probs: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor, n_templates: int
) -> torch.Tensor:
    """Prefix-augmented NLL of each fact's target (§4.3a): per sequence the mean NLL of the target's
    tokens, then the mean over the fact's ``n_templates`` sequences (one per context template).

    Args:
        log_probs: (B · n_templates, Ty, V) log-softmax at the positions that predict the target tokens,
            the sequences of fact b in rows b·n_templates … (b+1)·n_templates − 1.
        target_ids: (B, Ty) int64 target token ids, right-padded.
        target_mask: (B, Ty) 1 for a real target token, 0 for padding.
        n_templates: sequences per fact.

    Returns:
        (B,) -(1/n) Σ_s (1/T_b) Σ_t log P(y_bt | sequence s).
    """
    ids = target_ids.repeat_interleave(n_templates, dim=0)
    mask = target_mask.repeat_interleave(n_templates, dim=0)
    picked = log_probs.gather(2, ids[:, :, None])[:, :, 0]
    per_sequence = -(picked * mask).sum(dim=1) / mask.sum(dim=1)
    return per_sequence.view(-1, n_templates).mean(dim=1)


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


@dataclass
class LossTerms:
    """The objective's terms for the facts of one forward, each (B,); ``total`` is their weighted sum."""

    nll: torch.Tensor
    essence_kl: torch.Tensor
    alignment_kl: torch.Tensor
    topm_mse: torch.Tensor
    penalty: torch.Tensor
    total: torch.Tensor

    def of_fact(self, b: int) -> dict[str, float]:
        """Fact ``b``'s terms as floats, named as in :class:`FactStats`."""
        return {
            "loss": float(self.total[b].detach()),
            "nll": float(self.nll[b].detach()),
            "essence_kl": float(self.essence_kl[b].detach()),
            "alignment_kl": float(self.alignment_kl[b].detach()),
            "topm_mse": float(self.topm_mse[b].detach()),
            "penalty": float(self.penalty[b].detach()),
        }


@dataclass
class Alignment:
    """A batch's alignment constants (EAMET): candidates 0..e-1 = the facts up to the batch's end.

    Attributes:
        key_cos: (B, e) key cosines of each batch fact to every candidate; valid: (B, e) its support.
        top: (B, M) each fact's top-M key neighbours within its support (0 where ``top_valid`` is false);
        top_cos: (B, M) their key cosines.
    """

    key_cos: torch.Tensor
    valid: torch.Tensor
    top: torch.Tensor
    top_cos: torch.Tensor
    top_valid: torch.Tensor

    def rows(self, index: torch.Tensor) -> Alignment:
        """The constants of the facts ``index`` (a (b,) int64 tensor of batch rows) only."""
        return Alignment(
            self.key_cos[index],
            self.valid[index],
            self.top[index],
            self.top_cos[index],
            self.top_valid[index],
        )


def objective_terms(
    config: EditConfig,
    rows: torch.Tensor,
    nll: torch.Tensor,
    kl: torch.Tensor,
    *,
    h_norms: torch.Tensor,
    key_norms: torch.Tensor,
    alignment: Alignment | None,
    candidates: torch.Tensor | None,
) -> LossTerms:
    """The residual objective of B facts (§4.3) from their NLL and essence KL: the norm penalty, EAMET's
    alignment terms when ``alignment`` is given, and the weighted total.

    Args:
        config: the weights (``kl_factor``, ``cs_factor``, ``mse_factor``, ``tau``, ``eps``), the penalty and
            eamet's gate ``align_below_nll``.
        rows: (B, d) the facts' residuals δ.
        nll: (B,) :func:`target_nll`; kl: (B,) :func:`essence_kl`.
        h_norms, key_norms: (B,) ‖h_i‖ and ‖k_i‖.
        alignment: the facts' alignment constants (:meth:`Alignment.rows`); ``None`` for MEMIT.
        candidates: (e, d) the residuals the facts align against (those of facts 0..e-1).
    """
    penalty = norm_penalty(
        rows,
        config.norm_penalty,
        config.norm_penalty_factor,
        h_norm=h_norms.clamp_min(1e-12),
        key_radius=config.clamp_factor * key_norms,
    )
    a_kl = a_mse = torch.zeros_like(nll)
    if alignment is not None and candidates is not None:
        a_kl = alignment_kl_rows(rows, candidates, alignment.key_cos, alignment.valid, config.tau, config.eps)
        a_mse = topm_mse_rows(
            rows, candidates[alignment.top], alignment.top_cos, alignment.top_valid, config.tau
        )
    align = config.cs_factor * a_kl + config.mse_factor * a_mse
    if config.align_below_nll is not None:
        # eamet's extension: alignment only shapes residuals that already make their edit.
        align = align * (nll.detach() < config.align_below_nll)
    total = nll + config.kl_factor * kl + penalty + align
    return LossTerms(nll=nll, essence_kl=kl, alignment_kl=a_kl, topm_mse=a_mse, penalty=penalty, total=total)
