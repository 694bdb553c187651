"""Teacher-forced scoring of targets after prompts (algorithm.md §8): the per-pair NLL and the strict
(arg-max) and lenient (NLL against an alternative) notions of correct, shared by the editor's per-fact
outcomes and the evaluation protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eamet.base.errors import ParameterError
from eamet.model.batching import length_sorted_batches, pad_right
from eamet.model.parts import eval_mode
from eamet.model.tokens import TokenAdapter

__all__ = ["TargetScores", "lenient_correct", "score_targets"]


@dataclass(frozen=True)
class TargetScores:
    """Per (prompt, target) pair, in input order.

    Attributes:
        nll: (B,) float64 mean per-token negative log-likelihood of the target after the prompt.
        strict: (B,) bool, every target token is the arg-max at its position.
        token_hits: per pair, a (T_b,) bool tensor: which target tokens are the arg-max.
    """

    nll: torch.Tensor
    strict: torch.Tensor
    token_hits: list[torch.Tensor]


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tokens: TokenAdapter,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 40,
    on_batch: Callable[[int], None] | None = None,
) -> TargetScores:
    """Teacher-forced scores of ``targets[b]`` as the continuation of ``prompts[b]``.

    Each sequence is ``encode(prompt) + target_ids(target)[:-1]``: the last target token is predicted, never
    read. Runs in eval mode without gradients, ``batch_size`` sequences of similar length per forward.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V).
        tokens: the tokenisation (BOS policy, target ids).
        prompts: B filled prompts (no target).
        targets: B targets (a leading space is implied, as for edits).
        on_batch: called after each forward with the number of pairs it scored (progress bars).

    Returns:
        :class:`TargetScores`. Raises ``ParameterError`` for mismatched lengths or an empty prompt.
    """
    if len(prompts) != len(targets):
        raise ParameterError(f"{len(prompts)} prompts but {len(targets)} targets", argument="targets")
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}", argument="batch_size")
    encoded = []
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        prompt_ids, target_ids = tokens.encode(prompt), tokens.target_ids(target)
        if not prompt_ids:
            raise ParameterError(f"prompt {row} ({prompt!r}) encodes to no tokens", argument="prompts")
        encoded.append((prompt_ids, target_ids))
    device = next(model.parameters()).device
    n = len(encoded)
    nll = torch.zeros(n, dtype=torch.float64)
    hits: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * n
    lengths = [len(p) + len(t) - 1 for p, t in encoded]
    with eval_mode(model):
        for batch in length_sorted_batches(lengths, max_items=batch_size):
            seqs = [encoded[i][0] + encoded[i][1][:-1] for i in batch]
            inputs = pad_right(seqs, tokens.pad_id, device)
            log_probs = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
            for row, i in enumerate(batch):
                prompt_ids, target_ids = encoded[i]
                positions = torch.arange(len(target_ids), device=device) + len(prompt_ids) - 1
                wanted = torch.tensor(target_ids, device=device)
                scores = log_probs[row, positions]
                nll[i] = -scores.gather(1, wanted[:, None]).double().mean().cpu()
                hits[i] = (scores.argmax(dim=-1) == wanted).cpu()
            if on_batch is not None:
                on_batch(len(batch))
    strict = torch.tensor([bool(h.all()) for h in hits], dtype=torch.bool)
    return TargetScores(nll=nll, strict=strict, token_hits=hits)


def lenient_correct(nll_wanted: torch.Tensor, nll_other: torch.Tensor, *, ties: bool = True) -> torch.Tensor:
    """(B,) bool: the wanted object is at least as likely per token as the other.

    Efficacy and generalisation: wanted = new object, other = true object, ties count (the reference's
    ``NLL_new <= NLL_true``). Specificity: wanted = true object, other = new object, ``ties=False`` (the
    reference's ``NLL_new > NLL_true``).
    """
    return nll_wanted <= nll_other if ties else nll_wanted < nll_other
