"""Running the model for the residual step: B facts as one padded batch, the residuals added at their fact
tokens, and log-probabilities where the objective reads them.

Two ways to run it, with the same results (tests/test_residual_step.py):

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

from eamet.batching import pad_right
from eamet.config import EditConfig
from eamet.facts import SUBJECT_SLOT, fill
from eamet.hooks import add_to_output, hidden_of, record_outputs, replace_forward, run_until, with_hidden
from eamet.keys import PromptSet
from eamet.parts import ModelParts
from eamet.tokens import TokenAdapter

__all__ = ["FactBatch", "FullForward", "ResidualInjector", "SuffixForward"]


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
            for template, enc in zip(prompts.templates, prompts.encoded[i], strict=True):
                if config.teacher_forcing == "ids":
                    # Prompt ids ⊕ target ids: the logits at the last prompt token and after predict y.
                    ids = enc.ids + y[:-1]
                else:
                    # The reference: re-tokenise prompt text ⊕ decoded target prefix, score the last T.
                    text = fill(template.replace(SUBJECT_SLOT, fact.prompt, 1), fact.subject)
                    ids = tokens.encode(text + tokens.continuation_text(fact.target, y[:-1]))
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
    """What both ways share: the model, the edited block l*, the scoring block, and reading the scores."""

    def __init__(self, model: nn.Module, parts: ModelParts, layer: int, score_layer: int) -> None:
        self.model, self.parts, self.layer, self.score_layer = model, parts, layer, score_layer

    def prepare(self, batch: FactBatch) -> dict[int, Any]:
        """Per-batch work before the first iteration (the suffix path records blocks 0..l*)."""
        return {}

    @torch.no_grad()
    def bare_hidden(self, batch: FactBatch, prepared: dict[int, Any]) -> torch.Tensor:
        """(B, d) float32 h: block l*'s output at the fact token of each fact's bare prompt."""
        if self.layer in prepared:
            out = hidden_of(prepared[self.layer])
        else:
            store: dict[str, torch.Tensor] = {}
            block = self.parts.block(self.layer)
            with record_outputs({"h": block}, store):
                run_until(self.model, block, **batch.inputs)
            out = store["h"]
        rows = batch.bare_rows
        return out[rows, batch.inject_at[rows]].float()

    def log_probs(
        self,
        sub: FactBatch,
        prepared: dict[int, Any],
        rows: torch.Tensor,
        inject: ResidualInjector,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 log-probabilities where the objective reads them, for the sub-batch ``sub`` (the rows
        ``rows`` of the prepared batch) with the residuals added by ``inject``: (B·n_t, Ty, V) at the target
        positions and (B, V) at each essence prompt's fact token. The model runs in ``dtype`` (autocast)."""
        n_tf = sub.target_pos.shape[0]
        device = sub.inject_at.device
        tf_rows = torch.arange(n_tf, device=device)[:, None]
        ess_rows = torch.arange(n_tf, sub.inject_at.shape[0], device=device)
        bf16 = dtype == torch.bfloat16
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out, are_logits = self._output(sub, prepared, rows, inject)
            tf_out, ess_out = out[tf_rows, sub.target_pos], out[ess_rows, sub.inject_at[ess_rows]]
            if not are_logits:
                # Final norm and unembedding at the scored positions only (both act on each position alone).
                tf_out, ess_out = self._head(tf_out), self._head(ess_out)
        return torch.log_softmax(tf_out.float(), dim=-1), torch.log_softmax(ess_out.float(), dim=-1)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.parts.unembed(self.parts.final_norm(hidden))
        return out

    def _output(
        self, sub: FactBatch, prepared: dict[int, Any], rows: torch.Tensor, inject: ResidualInjector
    ) -> tuple[torch.Tensor, bool]:
        """(R, T, ·) the scoring block's output, or the model's logits (then ``True``)."""
        raise NotImplementedError


class SuffixForward(_Forward):
    """Blocks 0..l* once per batch, only the blocks after l* at every iteration.

    ``prepare`` records every block's raw output up to l*. While an iteration runs, blocks before l* hand
    their input through (the next one ignores it anyway), block l* returns its recorded output plus the
    residuals, and the model goes on from there to the scoring block.
    """

    @torch.no_grad()
    def prepare(self, batch: FactBatch) -> dict[int, Any]:
        outputs: dict[int, Any] = {}
        with ExitStack() as stack:
            for j in range(self.layer + 1):

                def keep(_m: nn.Module, _a: tuple[Any, ...], out: Any, j: int = j) -> None:
                    outputs[j] = out

                stack.callback(self.parts.block(j).register_forward_hook(keep).remove)
            run_until(self.model, self.parts.block(self.layer), **batch.inputs)
        return outputs

    def _output(
        self, sub: FactBatch, prepared: dict[int, Any], rows: torch.Tensor, inject: ResidualInjector
    ) -> tuple[torch.Tensor, bool]:
        width = sub.inputs["input_ids"].shape[1]
        # A block's other outputs (attention weights of some families) are handed on as recorded: the
        # model never reads them unless asked to return them.

        def passthrough(j: int) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                return with_hidden(prepared[j], hidden)

            return forward

        def edited(*_args: Any, **_kwargs: Any) -> Any:
            recorded = hidden_of(prepared[self.layer])[rows, :width]
            return with_hidden(prepared[self.layer], inject(recorded))

        store: dict[str, torch.Tensor] = {}
        scoring = self.parts.block(self.score_layer)
        with ExitStack() as stack:
            for j in range(self.layer):
                stack.enter_context(replace_forward(self.parts.block(j), passthrough(j)))
            stack.enter_context(replace_forward(self.parts.block(self.layer), edited))
            stack.enter_context(record_outputs({"h": scoring}, store))
            run_until(self.model, scoring, **sub.inputs)
        return store["h"], False


class FullForward(_Forward):
    """The whole model at every iteration, the residuals added by a hook on block l* (the reference)."""

    def _output(
        self, sub: FactBatch, prepared: dict[int, Any], rows: torch.Tensor, inject: ResidualInjector
    ) -> tuple[torch.Tensor, bool]:
        store: dict[str, torch.Tensor] = {}
        scoring = self.parts.block(self.score_layer)
        with add_to_output(self.parts.block(self.layer), inject), record_outputs({"h": scoring}, store):
            if self.score_layer == self.parts.num_layers - 1:
                logits: torch.Tensor = self.model(**sub.inputs).logits
                return logits, True
            run_until(self.model, scoring, **sub.inputs)
        return store["h"], False
