"""The weight update (algorithm.md §6): Δ (λC + KKᵀ) = R Kᵀ per edited layer, in float64.

An update is kept as two factors, the ``shares`` R (N × d) and the ``solved_keys`` U = K A⁻¹ (N × d_ff), so
Δ = Rᵀ U (d × d_ff). Both are stored in float32, and the edit itself applies Δ from the stored factors, so
a saved edit re-applied to the same weights reproduces them bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from eamet.base.errors import SolveError
from eamet.model.device import solve_device

__all__ = ["LayerUpdate", "apply_update", "solve_layer"]


@dataclass
class LayerUpdate:
    """One layer's weight change Δ = sharesᵀ @ solved_keys.

    Attributes:
        layer: block index; path: the rewrite module's dotted path.
        shares: (N, d) float32 CPU, R: this layer's share of z − h (the glossary in
            :mod:`eamet.base.settings`).
        solved_keys: (N, d_ff) float32 CPU, U = K (λC + KKᵀ)⁻¹.
        fit_error: (N,) float32 CPU, ‖Δk_i − r_i‖ / ‖r_i‖ per fact: how far the solve is from giving each
            fact its residual at this layer (0 = exact; λC pulls it away). Empty if not computed.
        leverage: (N,) float32 CPU, h_i = u_i·k_i = k_iᵀ(λC + KKᵀ)⁻¹k_i per fact: the share of a lone
            residual this layer's update realises (``eamet.edit.capacity``), from the stored factors. Empty if
            not computed.
        keys: (N, d_ff) float32 CPU, the keys K the layer was solved for (on the model as edited up to
            the layers before this one); ``None`` for an update read from a file (not saved: they are
            recomputed from the model and the facts).
    """

    layer: int
    path: str
    shares: torch.Tensor
    solved_keys: torch.Tensor
    fit_error: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    keys: torch.Tensor | None = field(default=None, repr=False)
    leverage: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def measure_fit(self, keys: torch.Tensor) -> None:
        """Fills :attr:`fit_error` and :attr:`leverage` from this layer's (N, d_ff) keys."""
        delta = self.weight_change(solve_device(keys.device))
        r = self.shares.to(delta.device, torch.float64)
        k = keys.to(delta.device, torch.float64)
        moved = k @ delta.T
        error = (moved - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)
        self.fit_error = error.float().cpu()
        # From the float32 factors the edit applies: the leverage the weights really got.
        self.leverage = (self.solved_keys.to(delta.device, torch.float64) * k).sum(dim=1).float().cpu()

    def weight_change(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Δ (d, d_ff) float64 on ``device``."""
        r = self.shares.to(device=device, dtype=torch.float64)
        u = self.solved_keys.to(device=device, dtype=torch.float64)
        return r.T @ u

    # The names of releases before the glossary (δ, shares, Δ); kept for scripts that use them.
    @property
    def residuals(self) -> torch.Tensor:
        """Deprecated name of :attr:`shares`."""
        warnings.warn("LayerUpdate.residuals is now LayerUpdate.shares", DeprecationWarning, stacklevel=2)
        return self.shares

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Deprecated name of :meth:`weight_change`."""
        warnings.warn(
            "LayerUpdate.delta() is now LayerUpdate.weight_change()", DeprecationWarning, stacklevel=2
        )
        return self.weight_change(device)


def solve_layer(
    moment: torch.Tensor, keys: torch.Tensor, lam: float, *, solver: str = "cholesky", layer: int = -1
) -> torch.Tensor:
    """U = K (λC + KᵀK)⁻¹, in float64 on ``moment``'s device.

    Args:
        moment: (d_ff, d_ff) C = E[k kᵀ], symmetric positive semi-definite.
        keys: (N, d_ff) this layer's keys (rows).
        lam: λ >= 0.
        solver: ``"cholesky"`` (factorise the SPD matrix, then two triangular solves) or ``"inverse"``
            (the reference's explicit inverse, for reproduction).

    Returns:
        (N, d_ff) float64 solved keys. Raises ``SolveError`` if the matrix is not positive definite.
    """
    device = solve_device(moment.device)
    k = keys.to(device=device, dtype=torch.float64)
    a = lam * moment.to(device=device, dtype=torch.float64) + k.T @ k
    if not bool(torch.isfinite(a).all()):
        raise SolveError(f"layer {layer}: λC + KKᵀ has NaN or Inf entries (check the keys and C)")
    if solver == "inverse":
        inverse, info = torch.linalg.inv_ex(a)
        if int(info) != 0:
            raise SolveError(
                f"layer {layer}: λC + KKᵀ is singular; raise mom2_update_weight or collect the "
                "C over more text",
                argument="mom2_update_weight",
            )
        solved: torch.Tensor = k @ inverse
    else:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            raise SolveError(
                f"layer {layer}: λC + KKᵀ is not positive definite (leading minor {int(info)}); raise "
                "mom2_update_weight or collect C over more text",
                argument="mom2_update_weight",
            )
        solved = torch.cholesky_solve(k.T, chol).T
    if not bool(torch.isfinite(solved).all()):
        raise SolveError(f"layer {layer}: the solve produced NaN or Inf (the system is too ill-conditioned)")
    return solved


@torch.no_grad()
def apply_update(weight: torch.Tensor, update: LayerUpdate, layout: str) -> None:
    """W ← W + Δ in place, rounded once to W's dtype. ``layout`` is the ArchSpec's weight_layout:
    ``"out_in"`` adds Δ (d × d_ff), ``"in_out"`` adds Δᵀ.
    """
    delta = update.weight_change(solve_device(weight.device))
    if layout == "in_out":
        delta = delta.T
    if tuple(delta.shape) != tuple(weight.shape):
        raise SolveError(
            f"{update.path}: update shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}"
        )
    edited = (weight.to(delta.device, torch.float64) + delta).to(weight.dtype)
    if not bool(torch.isfinite(edited).all()):
        # Also catches a finite Δ that overflows a half-precision weight.
        raise SolveError(f"{update.path}: the updated weight would hold NaN or Inf; nothing was changed")
    weight.copy_(edited)
