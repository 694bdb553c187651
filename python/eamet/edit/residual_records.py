"""What the residual step produces and reads: per-fact statistics, the residuals with their hidden
states, and the key-space neighbourhood the alignment terms compare against."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["FactStats", "KeyNeighborhood", "Residuals"]


@dataclass
class FactStats:
    """What the optimisation of one fact did (the last evaluated iteration's loss terms).

    ``seconds`` is the fact's share of its batch's time (the batch's time / its number of facts), so the
    seconds of the facts not ``reused`` add up to the residual step's time.
    """

    steps: int
    loss: float
    nll: float
    essence_kl: float
    alignment_kl: float
    topm_mse: float
    penalty: float
    delta_norm: float
    radius: float
    h_norm: float
    key_norm: float
    seconds: float
    reused: bool = False
    """Taken from a residual store (``seconds`` is then the time it took when it was computed)."""

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


@dataclass
class KeyNeighborhood:
    """Key-space statistics at l* from the unedited model (§3.4), without an N × N matrix.

    Attributes:
        unit_keys: (N, d_ff) float32 unit-norm keys; a batch's cosines to the facts before it are computed
            when that batch is optimised (B × N × d_ff once per batch).
        norms: (N,) float32 key norms κ_i.
    """

    unit_keys: torch.Tensor
    norms: torch.Tensor

    @classmethod
    def of(cls, keys: torch.Tensor) -> KeyNeighborhood:
        """From (N, d_ff) keys."""
        norms = keys.norm(dim=1)
        return cls(unit_keys=keys / norms.clamp_min(1e-12)[:, None], norms=norms)

    def cosines(self, rows: range, upto: int) -> torch.Tensor:
        """(len(rows), upto) cosines between the keys of facts ``rows`` and those of facts 0..upto-1."""
        return self.unit_keys[rows.start : rows.stop] @ self.unit_keys[:upto].T


@dataclass
class Residuals:
    """The result of the residual step for N facts: ``deltas`` and ``hidden`` (N, d) float32 — δ_i and
    h_i, block l*'s output at the fact token of the bare prompt — and one :class:`FactStats` per fact."""

    deltas: torch.Tensor
    hidden: torch.Tensor
    stats: list[FactStats]

    @property
    def targets(self) -> torch.Tensor:
        """(N, d) z_i = h_i + δ_i, what the update must make block l* output."""
        return self.hidden + self.deltas
