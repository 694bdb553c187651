"""Running the model for the residual step: B facts as one padded batch, the residuals added at their fact
tokens, and log-probabilities where the objective reads them.

Two ways to run it, with the same results (tests/edit/test_residual_step.py):

* :class:`SuffixForward` (``z_forward="fast"``): blocks 0..l* run once per batch (δ cannot change their
  output); at every iteration only the blocks after l* run, from that recorded output plus δ, and the final
  norm and unembedding are applied only at the scored positions;
* :class:`FullForward` (``z_forward="full"``): the whole model, every position's logits, every iteration —
  the reference's way, kept to check the fast path against and to fall back on.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eamet.base.settings import EditConfig
from eamet.edit.keys import PromptSet
from eamet.model.batching import pad_right
from eamet.model.hooks import (
    add_to_output,
    cache_keyword,
    hidden_of,
    record_outputs,
    replace_forward,
    run_until,
    with_hidden,
)
from eamet.model.parts import ModelParts
from eamet.model.tokens import TokenAdapter

__all__ = ["CachedSuffixForward", "FactBatch", "FullForward", "ResidualInjector", "SuffixForward"]


@dataclass
class FactBatch:
    """The sequences of B facts, right-padded. Rows ``b·n_t .. b·n_t + n_t − 1`` are fact b's teacher-forced
    prompts (one per template, template 0 the bare prompt); row ``B·n_t + b`` is its essence prompt.

    Attributes:
        n_templates: n_t, teacher-forced rows per fact.
        inputs: ``input_ids`` / ``attention_mask`` (R, T), R = B·(n_t + 1).
        inject_at: (R,) the fact-token position of each row.
        fact_of_row: (R,) which of the B facts each row belongs to.
        target_ids: (B, Ty) each fact's target ids, zero-padded; target_mask: (B, Ty) which are real.
        target_pos: (B·n_t, Ty) the positions whose logits predict each target token.
    """

    n_templates: int
    inputs: dict[str, torch.Tensor]
    inject_at: torch.Tensor
    fact_of_row: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_pos: torch.Tensor

    @classmethod
    def build(
        cls, tokens: TokenAdapter, prompts: PromptSet, facts: range, config: EditConfig, device: torch.device
    ) -> FactBatch:
        """The batch of ``facts`` (indices into ``prompts``), tokenised as ``config.teacher_forcing`` says."""
        tf_seqs: list[list[int]] = []
        tf_inject: list[int] = []
        positions: list[list[int]] = []
        essence_seqs: list[list[int]] = []
        essence_inject: list[int] = []
        targets: list[list[int]] = []
        for i in facts:
            fact = prompts.facts[i]
            y = tokens.target_ids(fact.target)
            targets.append(y)
            for t, enc in enumerate(prompts.encoded[i]):
                if config.teacher_forcing == "ids":
                    # Prompt ids ⊕ target ids: the logits at the last prompt token and after predict y.
                    ids = enc.ids + y[:-1]
                else:
                    # The reference: re-tokenise prompt text ⊕ decoded target prefix, score the last T.
                    ids = tokens.encode(prompts.text(i, t) + tokens.continuation_text(fact.target, y[:-1]))
                tf_seqs.append(ids)
                tf_inject.append(enc.fact_index)
                positions.append(list(range(len(ids) - len(y), len(ids))))
            essence = tokens.prompt(config.essence_prompt, fact.subject, config.fact_token)
            essence_seqs.append(essence.ids)
            essence_inject.append(essence.fact_index)
        size, n_t = len(facts), len(prompts.templates)
        ty = max(len(y) for y in targets)
        target_ids = torch.zeros((size, ty), dtype=torch.long)
        target_mask = torch.zeros((size, ty), dtype=torch.bool)
        target_pos = torch.zeros((size * n_t, ty), dtype=torch.long)
        for b, y in enumerate(targets):
            target_ids[b, : len(y)] = torch.tensor(y)
            target_mask[b, : len(y)] = True
        for r, pos in enumerate(positions):
            target_pos[r, : len(pos)] = torch.tensor(pos)
        fact_of_row = torch.cat([torch.arange(size).repeat_interleave(n_t), torch.arange(size)])
        return cls(
            n_templates=n_t,
            inputs=pad_right(tf_seqs + essence_seqs, tokens.pad_id, device),
            inject_at=torch.tensor(tf_inject + essence_inject, device=device),
            fact_of_row=fact_of_row.to(device),
            target_ids=target_ids.to(device),
            target_mask=target_mask.to(device),
            target_pos=target_pos.to(device),
        )

    @property
    def size(self) -> int:
        """B, the number of facts."""
        return int(self.target_ids.shape[0])

    @property
    def bare_rows(self) -> torch.Tensor:
        """(B,) each fact's bare-prompt row (template 0)."""
        return torch.arange(self.size, device=self.inject_at.device) * self.n_templates

    def select(self, facts: torch.Tensor) -> tuple[FactBatch, torch.Tensor]:
        """The sub-batch of the given local facts (ascending), trimmed to its longest row, and the rows it
        took from this batch."""
        n_t = self.n_templates
        tf_rows = (facts[:, None] * n_t + torch.arange(n_t, device=facts.device)).reshape(-1)
        rows = torch.cat([tf_rows, self.size * n_t + facts])
        width = int(self.inputs["attention_mask"][rows].sum(dim=1).max())
        sub = FactBatch(
            n_templates=n_t,
            inputs={k: v[rows, :width] for k, v in self.inputs.items()},
            inject_at=self.inject_at[rows],
            fact_of_row=torch.searchsorted(facts, self.fact_of_row[rows]),
            target_ids=self.target_ids[facts],
            target_mask=self.target_mask[facts],
            target_pos=self.target_pos[tf_rows],
        )
        return sub, rows


class ResidualInjector:
    """Adds fact b's residual row to a block's hidden states at the fact token of each of fact b's rows.

    Args:
        deltas: (B, d) the residuals (a leaf requiring grad while optimising).
        fact_of_row: (R,) which residual row each sequence gets; inject_at: (R,) at which position.
    """

    def __init__(self, deltas: torch.Tensor, fact_of_row: torch.Tensor, inject_at: torch.Tensor) -> None:
        self.deltas, self.fact_of_row, self.inject_at = deltas, fact_of_row, inject_at

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, T, d) hidden states with the residuals added (differentiable in ``deltas``)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        add = self.deltas[self.fact_of_row].to(hidden.dtype)
        return hidden.index_put((rows, self.inject_at), add, accumulate=True)


class _Forward:
    """What every way shares: the model, the edited block l*, the scoring block, and reading the scores.

    A subclass says how one iteration runs (:meth:`_output`) and, if it runs on positions other than the
    batch's own, where the scored positions are in its output (:meth:`_positions`)."""

    def __init__(self, model: nn.Module, parts: ModelParts, layer: int, score_layer: int) -> None:
        self.model, self.parts, self.layer, self.score_layer = model, parts, layer, score_layer

    def prepare(self, batch: FactBatch, dtype: torch.dtype) -> Any:
        """Per-batch work before the first iteration; returns what the iterations read."""
        return None

    @torch.no_grad()
    def bare_hidden(self, batch: FactBatch, prepared: Any) -> torch.Tensor:
        """(B, d) float32 h: block l*'s output at the fact token of each fact's bare prompt."""
        store: dict[str, torch.Tensor] = {}
        block = self.parts.block(self.layer)
        with record_outputs({"h": block}, store):
            run_until(self.model, block, **batch.inputs)
        rows = batch.bare_rows
        return store["h"][rows, batch.inject_at[rows]].float()

    def log_probs(
        self, sub: FactBatch, prepared: Any, rows: torch.Tensor, deltas: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 log-probabilities where the objective reads them, for the sub-batch ``sub`` (the rows
        ``rows`` of the prepared batch) with fact b's residual ``deltas[b]`` added at its fact tokens:
        (B·n_t, Ty, V) at the target positions and (B, V) at each essence prompt's fact token. The model
        runs in ``dtype`` (autocast)."""
        n_tf = sub.target_pos.shape[0]
        device = sub.inject_at.device
        tf_rows = torch.arange(n_tf, device=device)[:, None]
        ess_rows = torch.arange(n_tf, sub.inject_at.shape[0], device=device)
        target_pos, inject_at = self._positions(sub, prepared, rows)
        inject = ResidualInjector(deltas, sub.fact_of_row, inject_at)
        bf16 = dtype == torch.bfloat16
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out, are_logits = self._output(sub, prepared, rows, inject)
            tf_out, ess_out = out[tf_rows, target_pos], out[ess_rows, inject_at[ess_rows]]
            if not are_logits:
                # Final norm and unembedding at the scored positions only (both act on each position alone).
                tf_out, ess_out = self._head(tf_out), self._head(ess_out)
        return torch.log_softmax(tf_out.float(), dim=-1), torch.log_softmax(ess_out.float(), dim=-1)

    def _positions(
        self, sub: FactBatch, prepared: Any, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the target positions and fact tokens of ``sub`` are in :meth:`_output`'s output."""
        return sub.target_pos, sub.inject_at

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.parts.unembed(self.parts.final_norm(hidden))
        return out

    def _output(
        self, sub: FactBatch, prepared: Any, rows: torch.Tensor, inject: ResidualInjector
    ) -> tuple[torch.Tensor, bool]:
        """(R, T, ·) the scoring block's output, or the model's logits (then ``True``)."""
        raise NotImplementedError

    def _skipping(self, stack: ExitStack, edited: Any, passthrough: Any) -> None:
        """Blocks 0..l-1 hand their input through (the next one ignores it) and block l* returns ``edited``
        — their outputs are known already. A block's other outputs (attention weights of some families)
        are handed on as recorded: the model never reads them unless asked to return them."""
        for j in range(self.layer):
            stack.enter_context(replace_forward(self.parts.block(j), passthrough(j)))
        stack.enter_context(replace_forward(self.parts.block(self.layer), edited))


def _hidden_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class SuffixForward(_Forward):
    """Blocks 0..l* once per batch, only the blocks after l* at every iteration.

    ``prepare`` records every block's raw output up to l*. While an iteration runs, blocks before l* hand
    their input through, block l* returns its recorded output plus the residuals, and the model goes on
    from there to the scoring block.
    """

    @torch.no_grad()
    def prepare(self, batch: FactBatch, dtype: torch.dtype) -> dict[int, Any]:
        return _record_blocks(self.model, self.parts, self.layer, batch.inputs)

    @torch.no_grad()
    def bare_hidden(self, batch: FactBatch, prepared: Any) -> torch.Tensor:
        rows = batch.bare_rows
        return hidden_of(prepared[self.layer])[rows, batch.inject_at[rows]].float()

    def _output(
        self, sub: FactBatch, prepared: Any, rows: torch.Tensor, inject: ResidualInjector
    ) -> tuple[torch.Tensor, bool]:
        width = sub.inputs["input_ids"].shape[1]

        def passthrough(j: int) -> Any:
            return lambda *args, **kwargs: with_hidden(prepared[j], _hidden_argument(args, kwargs))

        def edited(*_args: Any, **_kwargs: Any) -> Any:
            recorded = hidden_of(prepared[self.layer])[rows, :width]
            return with_hidden(prepared[self.layer], inject(recorded))

        store: dict[str, torch.Tensor] = {}
        scoring = self.parts.block(self.score_layer)
        with ExitStack() as stack:
            self._skipping(stack, edited, passthrough)
            stack.enter_context(record_outputs({"h": scoring}, store))
            run_until(self.model, scoring, **sub.inputs)
        return store["h"], False


def _record_blocks(model: nn.Module, parts: ModelParts, upto: int, inputs: dict[str, Any]) -> dict[int, Any]:
    """The raw outputs of blocks 0..``upto`` for ``inputs`` (the forward stops after block ``upto``)."""
    outputs: dict[int, Any] = {}
    with ExitStack() as stack:
        for j in range(upto + 1):

            def keep(_m: nn.Module, _a: tuple[Any, ...], out: Any, j: int = j) -> None:
                outputs[j] = out

            stack.callback(parts.block(j).register_forward_hook(keep).remove)
        run_until(model, parts.block(upto), **inputs)
    return outputs


@dataclass
class _Prefix:
    """What :class:`CachedSuffixForward` keeps per batch, one row per sequence.

    Attributes:
        keys, values: per block, (R, H, P, hd) key and value states of each row's positions before its fact
            token, right-aligned in P = the longest such prefix (rows with shorter ones padded on the left).
        prefix_mask: (R, P) which prefix slots hold a position.
        start: (R,) the fact token's position f_r: the first position of each row's suffix.
        suffix_ids, suffix_mask: (R, S) the tokens from the fact token on, right-padded.
        edited: (R, S, d) block l*'s output at those positions (the residual is added at suffix position 0).
        recorded: block l*'s raw output (for the other elements of a tuple output).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix_mask: torch.Tensor
    start: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    edited: torch.Tensor
    recorded: Any

    def rows(self, rows: torch.Tensor) -> _Prefix:
        """The given rows, trimmed to their longest prefix and suffix."""
        prefix_mask, suffix_mask = self.prefix_mask[rows], self.suffix_mask[rows]
        p = int(prefix_mask.sum(dim=1).max())
        s = int(suffix_mask.sum(dim=1).max())
        first = prefix_mask.shape[1] - p
        return _Prefix(
            keys=[k[rows, :, first:] for k in self.keys],
            values=[v[rows, :, first:] for v in self.values],
            prefix_mask=prefix_mask[:, first:],
            start=self.start[rows],
            suffix_ids=self.suffix_ids[rows, :s],
            suffix_mask=suffix_mask[:, :s],
            edited=self.edited[rows, :s],
            recorded=self.recorded,
        )


class CachedSuffixForward(_Forward):
    """Like :class:`SuffixForward`, and more: a position before the fact token is not changed by δ in any
    block (attention is causal), so its key and value states in the blocks after l* are computed once per
    batch too, and every iteration runs only the positions from the fact token on, attending to those
    cached states (the model's own key/value cache, with explicit position ids). On CounterFact prompts
    with context templates that is about a quarter of the tokens.

    It relies on the family's cache and masking code (transformers' ``DynamicCache``); the residual step
    checks its scores against the whole model's on the first batch and falls back to
    :class:`SuffixForward` where they differ.
    """

    def __init__(self, model: nn.Module, parts: ModelParts, layer: int, score_layer: int) -> None:
        super().__init__(model, parts, layer, score_layer)
        # A forward without either keyword fails its first-batch check and falls back to SuffixForward.
        self._cache_argument = cache_keyword(model) or "past_key_values"

    @torch.no_grad()
    def prepare(self, batch: FactBatch, dtype: torch.dtype) -> _Prefix:
        from transformers import DynamicCache

        store: dict[str, Any] = {}
        cache = DynamicCache()
        block = self.parts.block(self.layer)
        hook = block.register_forward_hook(lambda _m, _a, out: store.__setitem__("out", out))
        try:
            last = self.parts.block(self.parts.num_layers - 1)
            run_until(self.model, last, **batch.inputs, **{self._cache_argument: cache}, use_cache=True)
        finally:
            hook.remove()
        mask = batch.inputs["attention_mask"].bool()
        start = batch.inject_at
        lengths = mask.sum(dim=1)
        p = int(start.max())
        s = int((lengths - start).max())
        # Prefix slot i of row r holds position i - (P - f_r); suffix slot j holds position f_r + j.
        slots = torch.arange(p, device=start.device)[None, :] - (p - start)[:, None]
        prefix_mask = slots >= 0
        prefix_index = slots.clamp_min(0)
        suffix_pos = start[:, None] + torch.arange(s, device=start.device)[None, :]
        suffix_mask = suffix_pos < lengths[:, None]
        suffix_index = suffix_pos.clamp_max(mask.shape[1] - 1)
        keys, values = [], []
        for layer in cache.layers:
            # A plain attention layer holds (R, H, T, hd) keys and values; anything else (linear attention,
            # a shared or sliding layer) makes this raise and the residual step use another path.
            k, v = getattr(layer, "keys"), getattr(layer, "values")  # noqa: B009
            if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)) or k.ndim != 4:
                raise TypeError(f"a {type(layer).__name__} cache layer is not plain attention")
            keys.append(_gather_positions(k, prefix_index).to(_cache_dtype(k, dtype)))
            values.append(_gather_positions(v, prefix_index).to(_cache_dtype(v, dtype)))
        out = hidden_of(store["out"])
        rows = torch.arange(out.shape[0], device=out.device)[:, None]
        return _Prefix(
            keys=keys,
            values=values,
            prefix_mask=prefix_mask,
            start=start,
            suffix_ids=batch.inputs["input_ids"].gather(1, suffix_index),
            suffix_mask=suffix_mask,
            edited=out[rows, suffix_index],
            recorded=store["out"],
        )

    @torch.no_grad()
    def bare_hidden(self, batch: FactBatch, prepared: Any) -> torch.Tensor:
        h: torch.Tensor = prepared.edited[batch.bare_rows, 0].float()
        return h

    def _positions(
        self, sub: FactBatch, prepared: Any, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = prepared.start[rows]
        n_tf = sub.target_pos.shape[0]
        # Padding slots of shorter targets (position 0, never scored) stay inside the suffix.
        return (sub.target_pos - start[:n_tf, None]).clamp_min(0), torch.zeros_like(sub.inject_at)

    def _output(
        self, sub: FactBatch, prepared: Any, rows: torch.Tensor, inject: ResidualInjector
    ) -> tuple[torch.Tensor, bool]:
        from transformers import DynamicCache

        part = prepared.rows(rows)
        cache = DynamicCache(ddp_cache_data=list(zip(part.keys, part.values, strict=True)))
        suffix_len = part.suffix_ids.shape[1]
        positions = part.start[:, None] + torch.arange(suffix_len, device=part.start.device)[None, :]

        def passthrough(_j: int) -> Any:
            return lambda *args, **kwargs: with_hidden(prepared.recorded, _hidden_argument(args, kwargs))

        def edited(*_args: Any, **_kwargs: Any) -> Any:
            return with_hidden(prepared.recorded, inject(part.edited))

        store: dict[str, torch.Tensor] = {}
        scoring = self.parts.block(self.score_layer)
        inputs = {
            "input_ids": part.suffix_ids,
            "attention_mask": torch.cat([part.prefix_mask, part.suffix_mask], dim=1).long(),
            "position_ids": positions,
            self._cache_argument: cache,
            "use_cache": True,
        }
        with ExitStack() as stack:
            self._skipping(stack, edited, passthrough)
            stack.enter_context(record_outputs({"h": scoring}, store))
            run_until(self.model, scoring, **inputs)
        return store["h"], False


def _gather_positions(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(R, H, P, hd) ``states[r, :, index[r, i]]`` of (R, H, T, hd) states and an (R, P) position index."""
    expanded = index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
    return states.gather(2, expanded)


def _cache_dtype(states: torch.Tensor, compute: torch.dtype) -> torch.dtype:
    """Cached states join the ones an iteration computes: in bfloat16 when the iterations run in it."""
    return torch.bfloat16 if compute == torch.bfloat16 and states.dtype == torch.float32 else states.dtype


class FullForward(_Forward):
    """The whole model at every iteration, the residuals added by a hook on block l* (the reference)."""

    def _output(
        self, sub: FactBatch, prepared: Any, rows: torch.Tensor, inject: ResidualInjector
    ) -> tuple[torch.Tensor, bool]:
        store: dict[str, torch.Tensor] = {}
        scoring = self.parts.block(self.score_layer)
        with add_to_output(self.parts.block(self.layer), inject), record_outputs({"h": scoring}, store):
            if self.score_layer == self.parts.num_layers - 1:
                logits: torch.Tensor = self.model(**sub.inputs).logits
                return logits, True
            run_until(self.model, scoring, **sub.inputs)
        return store["h"], False
