"""Evaluation metrics (algorithm.md §8): teacher-forced scoring of targets, strict and lenient.

(The module is ``evaluation``, not ``evaluate``: ``eamet.evaluate`` is the public function, and a submodule
of that name would replace it on the package as soon as it is imported.)

Two notions of "correct", always reported side by side:

* **strict**: every target token is the arg-max at its position under teacher forcing — the same as
  greedy decoding emitting exactly the target right after the prompt;
* **lenient**: the target's mean per-token NLL is below the alternative's (new object vs true object;
  reversed for neighbourhood prompts, which must keep the true object).

Scoring is batched: prompts and targets are tokenised once (the edit's BOS policy and target-token rules,
:class:`~eamet.tokens.TokenAdapter`), grouped by length, right-padded, and read at positions
``len(prompt) + j - 1`` for target token ``j``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eamet.batching import length_sorted_batches, pad_right
from eamet.errors import ParameterError
from eamet.facts import SUBJECT_SLOT
from eamet.templates import generate_templates
from eamet.tokens import TokenAdapter

__all__ = [
    "EVAL_PREFIX_SEEDS",
    "TargetScores",
    "evaluation_prefixes",
    "lenient_correct",
    "ngram_entropy",
    "score_targets",
]

# The reference evaluation's prefix seed words (algorithm.md §8.4).
EVAL_PREFIX_SEEDS = (
    "The",
    "Therefore",
    "You",
    "However",
    "And",
    "While",
    "To",
    "Nevertheless",
    "Never",
    "He",
)


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
) -> TargetScores:
    """Teacher-forced scores of ``targets[b]`` as the continuation of ``prompts[b]``.

    Each sequence is ``encode(prompt) + target_ids(target)[:-1]``: the last target token is predicted, never
    read. Runs in eval mode without gradients, ``batch_size`` sequences of similar length per forward.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V).
        tokens: the tokenisation (BOS policy, target ids).
        prompts: B filled prompts (no target).
        targets: B targets (a leading space is implied, as for edits).

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
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)
    strict = torch.tensor([bool(h.all()) for h in hits], dtype=torch.bool)
    return TargetScores(nll=nll, strict=strict, token_hits=hits)


def lenient_correct(nll_wanted: torch.Tensor, nll_other: torch.Tensor, *, ties: bool = True) -> torch.Tensor:
    """(B,) bool: the wanted object is at least as likely per token as the other.

    Efficacy and generalisation: wanted = new object, other = true object, ties count (the reference's
    ``NLL_new <= NLL_true``). Specificity: wanted = true object, other = new object, ``ties=False`` (the
    reference's ``NLL_new > NLL_true``).
    """
    return nll_wanted <= nll_other if ties else nll_wanted < nll_other


def evaluation_prefixes(
    model: nn.Module,
    tokens: TokenAdapter,
    length: int,
    *,
    seed: int | None = 0,
    seeds: Sequence[str] = EVAL_PREFIX_SEEDS,
) -> list[str]:
    """Prefixes put before evaluation prompts (algorithm.md §8.4), generated from ``model`` — call it before
    editing — by sampling ``length`` tokens after each seed word (temperature 0.7, top-k 50, top-p 0.9).

    Returns ``["<text>. ", ...]`` (one per seed word), or ``[""]`` (the bare prompt) when ``length`` is 0.
    Seeded (``seed=None`` samples unseeded, as the reference does).
    """
    if length < 0:
        raise ParameterError(f"prefix length must be >= 0, got {length}", argument="length")
    if length == 0:
        return [""]
    templates = generate_templates(
        model, tokens, seeds, length=length, temperature=0.7, top_k=50, top_p=0.9, seed=seed
    )
    return [t[: -len(SUBJECT_SLOT)] for t in templates[1:]]


# Words and single punctuation marks: a dependency-free stand-in for NLTK's word_tokenize (which the
# reference calls); they differ on contractions ("don't" -> "don", "'", "t" here, "do", "n't" in NLTK).
_WORDS = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str) -> float:
    """The reference's fluency score of one text (algorithm.md §8.3): (2/3·H₂ + 4/3·H₃) / 2, where Hₙ is
    the Shannon entropy in bits of the text's n-gram frequency distribution. 0 for texts too short to
    hold a bigram; a text repeating itself scores low.
    """
    words = _WORDS.findall(text)
    weighted = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / 2
