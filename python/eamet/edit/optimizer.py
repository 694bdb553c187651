"""The residual (z) step (algorithm.md §4): find δ_i so that adding it to block l*'s output at the subject's
last token makes the model say the new object.

Facts are optimised in batches of ``config.fact_batch`` (B; 1 is the reference's serial order). A batch is
one padded set of sequences — each fact's teacher-forced prompts (one per context template) and its
essence prompt — and one residual row per fact, added by a :class:`ResidualInjector` at that fact's rows.
The batch's loss is the sum of the facts' own losses, and Adam is element-wise, so each row follows the
trajectory it would follow alone; each fact stops early and is projected onto its ball on its own.

With the alignment terms on (EAMET) fact i's objective reads the residuals of earlier facts: the saved ones
of earlier batches and, inside its own batch, what ``config.batch_alignment`` says. MEMIT is the same loop
with those terms off, so batching it is exact.

Each iteration runs only what δ can change (``config.z_forward="fast"``; :mod:`eamet.edit.residual_forward`):
the blocks up to l* and, in every block, the positions before each fact token run once per batch, and logits
are computed only at the scored positions.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eamet.base.errors import NonFiniteError
from eamet.base.progress import progress_bar
from eamet.base.settings import EditConfig
from eamet.edit.keys import PromptSet
from eamet.edit.objective import Alignment, essence_kl, objective_terms, target_nll
from eamet.edit.residual_forward import CachedSuffixForward, FactBatch, FullForward, SuffixForward
from eamet.edit.residual_records import FactStats, KeyNeighborhood, Residuals
from eamet.model.device import resolve_z_dtype
from eamet.model.parts import ModelParts
from eamet.model.tokens import TokenAdapter

if TYPE_CHECKING:
    from eamet.edit.store import KeyChain, ResidualStore

__all__ = ["ResidualOptimizer"]


def _from_store(
    store: ResidualStore | None, keys: list[str]
) -> tuple[torch.Tensor, torch.Tensor, list[FactStats]] | None:
    """A batch's stored residuals, hidden states and stats (marked reused), if the store holds all of
    its facts."""
    if store is None:
        return None
    found = []
    for key in keys:
        entry = store.get(key)
        if entry is None:
            return None
        found.append(entry)
    stats = [replace(e.stats, reused=True) for e in found]
    return torch.stack([e.delta for e in found]), torch.stack([e.hidden for e in found]), stats


@dataclass
class _Descent:
    deltas: torch.Tensor
    stats: list[dict[str, Any]]


class ResidualOptimizer:
    """Optimises the residuals of all facts, batch by batch.

    Args:
        model, parts, tokens: the model, its resolved modules and tokenisation.
        config: the edit settings (layers, losses, optimiser, batching, dtype).
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
        self.score_layer = last if config.v_loss_layer is None else min(config.v_loss_layer, last)
        self.device = parts.device
        self.compute_dtype = resolve_z_dtype(config.z_dtype, self.device)
        self.align = config.cs_factor > 0 or config.mse_factor > 0
        # How the iterations run the model: chosen on the first batch (see _choose_forward).
        self.forward: CachedSuffixForward | SuffixForward | FullForward | None = None

    # -- all facts -------------------------------------------------------------------------------------

    def run(
        self,
        store: ResidualStore | None = None,
        chain: KeyChain | None = None,
        *,
        progress: bool = True,
    ) -> Residuals:
        """Optimises every fact in batches of ``config.fact_batch``; with a ``store`` (and the ``chain``
        of this edit's keys), a batch whose facts are all stored is taken from it, and every batch
        computed is saved to it."""
        if (store is None) != (chain is None):
            raise ValueError("a residual store needs the key chain of the edit, and vice versa")
        n, d = len(self.prompts.facts), self.parts.hidden_dim(self.layer)
        deltas = torch.zeros((n, d), device=self.device)
        hidden = torch.zeros((n, d), device=self.device)
        stats: list[FactStats] = []
        size = self.config.fact_batch
        with progress_bar(
            total=n, desc=f"{self.config.method} residuals", unit="fact", enabled=progress
        ) as bar:
            for start in range(0, n, size):
                facts = range(start, min(start + size, n))
                keys = chain.keys(facts) if chain is not None else []
                found = _from_store(store, keys)
                if found is not None:
                    batch_d, batch_h, batch_stats = found
                else:
                    with torch.enable_grad():
                        batch_d, batch_h, batch_stats = self.optimize(facts, deltas[:start])
                    if store is not None:
                        for key, dv, hv, st in zip(keys, batch_d, batch_h, batch_stats, strict=True):
                            store.put(key, dv, hv, st)
                if chain is not None:
                    chain.advance(facts, batch_d.float())
                deltas[facts.start : facts.stop] = batch_d.to(self.device)
                hidden[facts.start : facts.stop] = batch_h.to(self.device)
                stats.extend(batch_stats)
                bar.update(len(facts))
                last = batch_stats[-1]
                bar.set_postfix(loss=f"{last.loss:.3f}", nll=f"{last.nll:.3f}", refresh=False)
        return Residuals(deltas=deltas, hidden=hidden, stats=stats)

    # -- one batch -------------------------------------------------------------------------------------

    def optimize(
        self, facts: range, saved: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[FactStats]]:
        """Optimises the residuals of the consecutive facts ``facts`` (one batch).

        Args:
            facts: the facts' indices (their positions in the editing order).
            saved: (facts.start, d) float32 residuals of the facts before the batch (read only when the
                alignment terms are on).

        Returns:
            ``(deltas, h, stats)``: (B, d) float32 residuals δ, (B, d) float32 hidden states h — block
            l*'s output at the fact token of each bare prompt — and one :class:`FactStats` per fact.
        """
        start_time = time.perf_counter()
        batch = FactBatch.build(self.tokens, self.prompts, facts, self.config, self.device)
        if self.forward is None:
            self.forward = self._choose_forward(batch)
        cache = self.forward.prepare(batch, self.compute_dtype)
        h = self.forward.bare_hidden(batch, cache)
        key_norms = self.nbhd.norms[facts.start : facts.stop].float()
        h_norms = h.norm(dim=1)
        init = self._initial(h, h_norms, key_norms)
        radius = self._radius(key_norms, h_norms)
        alignment = self._alignment(facts) if self.align and facts.stop > 1 else None
        mode = self.config.batch_alignment if len(facts) > 1 else "current"
        descent = self._descend(facts, batch, cache, saved, alignment, init, h_norms, key_norms, radius, None)
        if alignment is not None and mode == "second_pass":
            descent = self._descend(
                facts, batch, cache, saved, alignment, init, h_norms, key_norms, radius, descent.deltas
            )
        seconds = (time.perf_counter() - start_time) / len(facts)
        stats = [
            FactStats(
                **row,
                delta_norm=float(descent.deltas[b].norm()),
                radius=float(radius[b]),
                h_norm=float(h_norms[b]),
                key_norm=float(key_norms[b]),
                seconds=seconds,
            )
            for b, row in enumerate(descent.stats)
        ]
        return descent.deltas, h, stats

    def _descend(
        self,
        facts: range,
        batch: FactBatch,
        cache: Any,
        saved: torch.Tensor,
        alignment: Alignment | None,
        init: torch.Tensor,
        h_norms: torch.Tensor,
        key_norms: torch.Tensor,
        radius: torch.Tensor,
        first_pass: torch.Tensor | None,
    ) -> _Descent:
        """Adam on the batch's residual rows until each fact stops; ``first_pass`` (B, d): in-batch
        alignment candidates from a previous pass (``second_pass``)."""
        cfg, forward = self.config, self.forward
        assert forward is not None
        size = len(facts)
        delta = init.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
        active = torch.ones(size, dtype=torch.bool, device=self.device)
        final = init.clone()
        steps = [0] * size
        stats: list[dict[str, Any]] = [{} for _ in range(size)]
        # The essence-KL anchor: iteration 0's distributions (with δ₀: the reference's EAMET behaviour), or
        # the unedited model's, which differ only where δ₀ ≠ 0.
        anchor = self._unedited_anchor(batch, cache, init) if cfg.kl_anchor == "unedited" else None
        anchor_from_first = anchor is None
        # The residuals the batch aligns against (e, d): the saved ones of earlier facts, copied once, then
        # the batch's own rows, refreshed at every iteration.
        candidates = None
        if alignment is not None:
            candidates = torch.empty((facts.stop, delta.shape[1]), device=self.device)
            candidates[: facts.start] = saved[: facts.start]
        for it in range(cfg.v_num_grad_steps):
            optimizer.zero_grad(set_to_none=True)
            if candidates is not None:
                # The batch's own rows: their current iterates (detached), or a first pass's results.
                candidates[facts.start :] = first_pass if first_pass is not None else delta.detach()
            stopping = torch.zeros_like(active)
            for chunk in self._chunks(active.nonzero()[:, 0], batch):
                sub, rows = batch.select(chunk)
                log_probs, ess = forward.log_probs(sub, cache, rows, delta[chunk], self.compute_dtype)
                if anchor is None:
                    anchor = ess.new_zeros((size, ess.shape[1]))
                if it == 0 and anchor_from_first:
                    anchor[chunk] = ess.detach()
                terms = objective_terms(
                    cfg,
                    delta[chunk],
                    target_nll(log_probs, sub.target_ids, sub.target_mask, sub.n_templates),
                    essence_kl(ess, anchor[chunk]),
                    h_norms=h_norms[chunk],
                    key_norms=key_norms[chunk],
                    alignment=alignment.rows(chunk) if alignment is not None else None,
                    candidates=candidates,
                )
                totals = terms.total.detach()
                done = self._stops(it, totals)
                for k, b in enumerate(chunk.tolist()):
                    value = float(totals[k])
                    if not math.isfinite(value):
                        raise NonFiniteError(
                            f"fact {facts.start + b}: the loss became {value} at iteration {it}",
                            row=facts.start + b,
                        )
                    stats[b] = terms.of_fact(k)
                stopping[chunk[done]] = True
                keep = ~done
                if bool(keep.any()):
                    terms.total[keep].sum().backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():
                final[stopping] = delta[stopping]
            active &= ~stopping
            if not bool(active.any()):
                break
            optimizer.step()
            with torch.no_grad():
                delta[~active] = final[~active]  # finished rows stay where they stopped
                norms = delta.norm(dim=1)
                over = active & (norms > radius)
                delta[over] *= (radius[over] / norms[over])[:, None]
            for b in active.nonzero()[:, 0].tolist():
                steps[b] += 1
        for b in range(size):
            stats[b]["steps"] = steps[b]
        return _Descent(deltas=final.detach(), stats=stats)

    def _stops(self, it: int, totals: torch.Tensor) -> torch.Tensor:
        """(B,) which facts stop at iteration ``it``: the last iteration takes no step; from
        ``early_stop_from`` on, a loss below ``early_stop_loss`` ends a fact's optimisation."""
        cfg = self.config
        if it == cfg.v_num_grad_steps - 1:
            return torch.ones_like(totals, dtype=torch.bool)
        if it >= cfg.early_stop_from:
            return totals < cfg.early_stop_loss
        return torch.zeros_like(totals, dtype=torch.bool)

    def _chunks(self, facts: torch.Tensor, batch: FactBatch) -> list[torch.Tensor]:
        budget = self.config.z_chunk_tokens
        if budget is None or len(facts) <= 1:
            return [facts]
        width = int(batch.inputs["input_ids"].shape[1])
        per_fact = (batch.n_templates + 1) * width
        size = max(1, budget // per_fact)
        return [facts[i : i + size] for i in range(0, len(facts), size)]

    # -- pieces ----------------------------------------------------------------------------------------

    def _initial(self, h: torch.Tensor, h_norms: torch.Tensor, key_norms: torch.Tensor) -> torch.Tensor:
        """δ₀ per fact (§4.2): ``target_init`` points along h with the key's length when 0 < ‖h‖ < the
        reference's threshold; otherwise zero."""
        init = torch.zeros_like(h)
        if self.config.delta_init == "target_init":
            use = (h_norms > 0) & (h_norms < self.config.target_init_max_norm)
            init[use] = h[use] * (key_norms[use] / h_norms[use])[:, None]
        return init

    def _radius(self, key_norms: torch.Tensor, h_norms: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.clamp == "key_norm":
            return cfg.clamp_factor * key_norms
        if cfg.clamp == "hidden_norm":
            return cfg.clamp_factor * h_norms
        return torch.full_like(key_norms, math.inf)

    @torch.no_grad()
    def _alignment(self, facts: range) -> Alignment:
        """Key cosines of the batch's facts to every fact up to its end, their supports and top-M sets."""
        cfg = self.config
        end = facts.stop
        key_cos = self.nbhd.cosines(facts, end)
        own = torch.arange(facts.start, end, device=self.device)[:, None]
        candidate = torch.arange(end, device=self.device)[None, :]
        # A fact's support: every earlier fact, or (``none``) only those of earlier batches.
        limit = own if cfg.batch_alignment != "none" else torch.full_like(own, facts.start)
        valid = candidate < limit
        m = min(cfg.top_m, end)
        top_cos, top = key_cos.masked_fill(~valid, float("-inf")).topk(m, dim=1)
        top_valid = torch.isfinite(top_cos)
        return Alignment(
            key_cos=key_cos,
            valid=valid,
            top=top.masked_fill(~top_valid, 0),
            top_cos=top_cos.masked_fill(~top_valid, 0.0),
            top_valid=top_valid,
        )

    @torch.no_grad()
    def _unedited_anchor(self, batch: FactBatch, cache: Any, init: torch.Tensor) -> torch.Tensor | None:
        """The essence distributions without any residual (``kl_anchor="unedited"``), or ``None`` when
        δ₀ = 0 for every fact (then iteration 0 is the unedited model and gives them)."""
        if not bool(init.any()):
            return None
        assert self.forward is not None
        sub, rows = batch.select(torch.arange(batch.size, device=self.device))
        return self.forward.log_probs(sub, cache, rows, torch.zeros_like(init), self.compute_dtype)[1]

    @torch.no_grad()
    def _choose_forward(self, batch: FactBatch) -> CachedSuffixForward | SuffixForward | FullForward:
        """The fastest way to run the iterations that gives the whole model's scores on this batch.

        ``z_forward="full"`` is the whole model. Otherwise the cached-prefix path, then the suffix path, are
        scored against the whole model (float32, with a residual of half of h at every fact token); the
        first that agrees to 2e-4 in every scored log-probability (float32 rounding is ~1e-5) is used. If
        neither does (an ArchSpec whose final norm and unembedding are not the model's head), a warning
        says so and the whole model is used.
        """
        args = (self.model, self.parts, self.layer, self.score_layer)
        full = FullForward(*args)
        if self.config.z_forward == "full":
            return full
        sub, rows = batch.select(torch.arange(batch.size, device=self.device))
        probe = 0.5 * full.bare_hidden(batch, None)
        expected = full.log_probs(sub, None, rows, probe, torch.float32)
        worst = math.inf
        for candidate in (CachedSuffixForward(*args), SuffixForward(*args)):
            try:
                prepared = candidate.prepare(batch, torch.float32)
                got = candidate.log_probs(sub, prepared, rows, probe, torch.float32)
            except Exception:
                continue
            worst = _worst_difference(got, expected, sub)
            if worst <= 2e-4:
                return candidate
        warnings.warn(
            "the residual step's fast paths differ from the whole model's log-probabilities "
            f"(by {worst:.3g}) on {self.parts.model_type}; running the whole model at every iteration "
            "instead (z_forward='full'). Check the ArchSpec's final_norm and unembed paths.",
            stacklevel=4,
        )
        return full


def _worst_difference(
    got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor], sub: FactBatch
) -> float:
    """The largest difference between two ways' log-probabilities where the objective reads them (the
    padding slots of shorter targets read arbitrary positions)."""
    scored = sub.target_mask.repeat_interleave(sub.n_templates, dim=0)
    tf = (got[0] - expected[0]).abs().amax(dim=-1)[scored]
    return max(float(tf.max()), float((got[1] - expected[1]).abs().max()))
