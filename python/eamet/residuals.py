"""The per-fact residual optimisation (algorithm.md §4): find δ_i so that adding it to block l*'s output
at the subject's last token makes the model say the new object.

Facts run serially, in request order; with the alignment terms on (EAMET) fact i's objective reads the
saved residuals of facts 0..i-1. MEMIT is the same loop with those terms off (see config.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from eamet.batching import pad_right
from eamet.config import EditConfig
from eamet.errors import NonFiniteError
from eamet.facts import SUBJECT_SLOT, fill
from eamet.hooks import add_to_output, record_outputs, run_until
from eamet.keys import PromptSet
from eamet.losses import alignment_kl, essence_kl, norm_penalty, target_nll, topm_mse
from eamet.parts import ModelParts
from eamet.tokens import TokenAdapter

__all__ = ["FactStats", "KeyNeighborhood", "ResidualOptimizer"]


@dataclass
class FactStats:
    """What the optimisation of one fact did (the last evaluated iteration's loss terms)."""

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

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class KeyNeighborhood:
    """Key-space statistics at l* from the unedited model (§3.4), without an N × N matrix.

    Attributes:
        unit_keys: (N, d_ff) float32 unit-norm keys; row i's cosines to earlier facts are computed when
            fact i is optimised (O(i·d_ff) once per fact).
        norms: (N,) float32 key norms κ_i.
        top: (N, M) int64 indices of each fact's top-M key neighbours among earlier facts (-1 padding),
            from the Rust core (``eamet.neighbors(progressive=True)``).
    """

    unit_keys: torch.Tensor
    norms: torch.Tensor
    top: torch.Tensor

    def cosines(self, i: int) -> torch.Tensor:
        """(i,) cosines between fact i's key and facts 0..i-1's."""
        return self.unit_keys[:i] @ self.unit_keys[i]


@dataclass
class _FactBatch:
    inputs: dict[str, torch.Tensor]
    inject_at: torch.Tensor  # (B,) fact-token position per row; the last row is the essence prompt
    target_ids: torch.Tensor  # (Ty,)
    target_positions: torch.Tensor  # (B-1, Ty)


class ResidualOptimizer:
    """Optimises residuals fact by fact.

    Args:
        model, parts, tokens: the model, its resolved modules and tokenisation.
        config: the edit settings (layers, losses, optimiser).
        prompts: the facts' templated prompts.
        neighborhood: key statistics at l* (needed when the alignment terms are on).
    """

    def __init__(
        self,
        model: nn.Module,
        parts: ModelParts,
        tokens: TokenAdapter,
        config: EditConfig,
        prompts: PromptSet,
        neighborhood: KeyNeighborhood,
    ) -> None:
        self.model, self.parts, self.tokens, self.config = model, parts, tokens, config
        self.prompts = prompts
        self.nbhd = neighborhood
        self.layer = config.layers[-1]
        last = parts.num_layers - 1
        self.loss_layer = last if config.v_loss_layer is None else min(config.v_loss_layer, last)

    def _batch(self, i: int) -> _FactBatch:
        fact = self.prompts.facts[i]
        y = self.tokens.target_ids(fact.target)
        seqs, inject, positions = [], [], []
        for template, enc in zip(self.prompts.templates, self.prompts.encoded[i], strict=True):
            if self.config.teacher_forcing == "ids":
                # Prompt ids ⊕ target ids: the logits at the last prompt token and after predict y_1..y_T.
                ids = enc.ids + y[:-1]
            else:
                # The reference: re-tokenise prompt text ⊕ decoded target prefix, score the last T positions.
                text = fill(template.replace(SUBJECT_SLOT, fact.prompt, 1), fact.subject)
                ids = self.tokens.encode(text + self.tokens.continuation_text(fact.target, y[:-1]))
            seqs.append(ids)
            inject.append(enc.fact_index)
            positions.append(list(range(len(ids) - len(y), len(ids))))
        essence = self.tokens.prompt(self.config.essence_prompt, fact.subject, self.config.fact_token)
        seqs.append(essence.ids)
        inject.append(essence.fact_index)
        device = self.parts.device
        return _FactBatch(
            inputs=pad_right(seqs, self.tokens.pad_id, device),
            inject_at=torch.tensor(inject, device=device),
            target_ids=torch.tensor(y, device=device),
            target_positions=torch.tensor(positions, device=device),
        )

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_layer == self.parts.num_layers - 1:
            return self.model(**inputs).logits  # type: ignore[no-any-return]
        # An earlier scoring block: final norm + unembedding applied to its output, as the reference does.
        store: dict[str, torch.Tensor] = {}
        with record_outputs({"h": self.parts.block(self.loss_layer)}, store):
            run_until(self.model, self.parts.block(self.loss_layer), **inputs)
        out: torch.Tensor = self.parts.unembed(self.parts.final_norm(store["h"]))
        return out

    def optimize(self, i: int, saved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, FactStats]:
        """Optimises fact i's residual.

        Args:
            i: the fact's index (its position in the editing order).
            saved: (i, d) float32 residuals of facts 0..i-1 (read only when the alignment terms are on).

        Returns:
            ``(delta, h, stats)``: δ_i (d,) float32, h_i (d,) float32 — block l*'s output at the fact
            token of the bare prompt — and the run's :class:`FactStats`. Both vectors detached.
        """
        cfg = self.config
        start = time.perf_counter()
        batch = self._batch(i)
        rows = torch.arange(batch.inject_at.shape[0], device=batch.inject_at.device)
        key_norm = float(self.nbhd.norms[i])
        align = i > 0 and (cfg.cs_factor > 0 or cfg.mse_factor > 0)
        if align:
            key_cos = self.nbhd.cosines(i)
            top = self.nbhd.top[i]
            top = top[top >= 0]
            key_cos_top = key_cos[top]
            saved_top = saved[top]

        delta = torch.zeros(self.parts.hidden_dim(self.layer), device=self.parts.device, requires_grad=True)
        state: dict[str, Any] = {"h": None, "off": False}

        def inject(hidden: torch.Tensor) -> torch.Tensor:
            if state["off"]:
                return hidden
            if state["h"] is None:  # first forward: record h and place δ₀ (the reference does it here too)
                h = hidden[0, batch.inject_at[0]].detach().float()
                state["h"] = h
                h_norm = float(h.norm())
                if cfg.delta_init == "target_init" and h_norm < cfg.target_init_max_norm and h_norm > 0:
                    with torch.no_grad():
                        delta.copy_(h * (key_norm / h_norm))
            add = delta.to(hidden.dtype).expand(rows.shape[0], -1)
            return hidden.index_put((rows, batch.inject_at), add, accumulate=True)

        optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
        anchor: torch.Tensor | None = None
        terms: dict[str, float] = {}
        steps = 0
        radius = math.inf
        h_norm = 0.0
        with add_to_output(self.parts.block(self.layer), inject):
            for it in range(cfg.v_num_grad_steps):
                optimizer.zero_grad(set_to_none=True)
                logits = self._logits(batch.inputs)
                n_tf, n_y = batch.target_positions.shape
                # Log-softmax only where a target token is scored: (n_tf, Ty, V), not (n_tf, T, V).
                scored = logits[torch.arange(n_tf, device=logits.device)[:, None], batch.target_positions]
                log_probs = torch.log_softmax(scored.float(), dim=-1)
                nll = target_nll(log_probs, batch.target_ids, self._arange(n_y).expand(n_tf, n_y))
                ess = torch.log_softmax(logits[n_tf, batch.inject_at[n_tf]].float(), dim=-1)
                if anchor is None:
                    h_norm = float(state["h"].norm())
                    radius = self._radius(key_norm, h_norm)
                    # Iteration 0's essence distribution already holds δ₀: the reference's EAMET anchor.
                    # "unedited" asks for the model without δ, which differs only when δ₀ ≠ 0.
                    anchor = ess.detach()
                    if cfg.kl_anchor == "unedited" and float(delta.detach().norm()) > 0:
                        state["off"] = True
                        try:
                            anchor = self._essence_log_probs(batch)
                        finally:
                            state["off"] = False
                kl = essence_kl(ess, anchor)
                penalty = norm_penalty(
                    delta,
                    cfg.norm_penalty,
                    cfg.norm_penalty_factor,
                    h_norm=max(h_norm, 1e-12),
                    key_radius=cfg.clamp_factor * key_norm,
                )
                loss = nll + cfg.kl_factor * kl + penalty
                a_kl = a_mse = delta.new_zeros(())
                if align:
                    a_kl = alignment_kl(delta, saved, key_cos, cfg.tau, cfg.eps)
                    a_mse = topm_mse(delta, saved_top, key_cos_top, cfg.tau) if top.numel() else a_mse
                    loss = loss + cfg.cs_factor * a_kl + cfg.mse_factor * a_mse
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise NonFiniteError(f"fact {i}: the loss became {loss_value} at iteration {it}", row=i)
                terms = {
                    "loss": loss_value,
                    "nll": float(nll.detach()),
                    "essence_kl": float(kl.detach()),
                    "alignment_kl": float(a_kl.detach()),
                    "topm_mse": float(a_mse.detach()),
                    "penalty": float(penalty.detach()),
                }
                if it >= cfg.early_stop_from and loss_value < cfg.early_stop_loss:
                    break
                if it == cfg.v_num_grad_steps - 1:
                    break
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
                with torch.no_grad():
                    norm = float(delta.norm())
                    if norm > radius:
                        delta.mul_(radius / norm)
        h = state["h"]
        assert h is not None
        stats = FactStats(
            steps=steps,
            delta_norm=float(delta.detach().norm()),
            radius=radius,
            h_norm=h_norm,
            key_norm=key_norm,
            seconds=time.perf_counter() - start,
            **terms,
        )
        return delta.detach().clone(), h.clone(), stats

    def _arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.parts.device)

    def _radius(self, key_norm: float, h_norm: float) -> float:
        cfg = self.config
        if cfg.clamp == "key_norm":
            return cfg.clamp_factor * key_norm
        if cfg.clamp == "hidden_norm":
            return cfg.clamp_factor * h_norm
        return math.inf

    @torch.no_grad()
    def _essence_log_probs(self, batch: _FactBatch) -> torch.Tensor:
        row = batch.inputs["input_ids"].shape[0] - 1
        length = int(batch.inputs["attention_mask"][row].sum())
        single = {k: v[row : row + 1, :length] for k, v in batch.inputs.items()}
        logits = self._logits(single)
        return torch.log_softmax(logits[0, batch.inject_at[row]].float(), dim=-1)
