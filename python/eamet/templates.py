"""Context templates (algorithm.md §2): short texts sampled from the unedited model, put before a prompt
so that keys and the residual hold up under different preceding contexts.

Unlike the reference, sampling is seeded (a private ``torch.Generator``, so the global RNG is left alone)
and written as a small loop rather than ``model.generate``: one sequence at a time, so no padding can
shift positions, on any architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from eamet.facts import SUBJECT_SLOT
from eamet.tokens import TokenAdapter

__all__ = ["BARE_TEMPLATE", "generate_templates", "template_weights"]

BARE_TEMPLATE = SUBJECT_SLOT


@torch.no_grad()
def generate_templates(
    model: nn.Module,
    tokens: TokenAdapter,
    seeds: Sequence[str],
    *,
    length: int = 10,
    temperature: float = 0.5,
    top_k: int = 100,
    top_p: float = 0.9,
    seed: int | None = 0,
) -> list[str]:
    """``["{}", "<text 1>. {}", ...]``: the bare template, then one sampled template per seed word.

    Each text is the seed word plus up to ``length`` sampled tokens (temperature, then top-k, then top-p,
    as transformers orders them), stopped early at EOS, decoded without special tokens, with ``{``/``}``
    replaced by spaces. ``seed=None`` samples unseeded, as the reference does. ``length=0`` or no seed
    words gives only the bare template.
    """
    if length == 0 or not seeds:
        return [BARE_TEMPLATE]
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    device = next(model.parameters()).device
    eos = tokens.tokenizer.eos_token_id
    out = [BARE_TEMPLATE]
    for word in seeds:
        ids = tokens.encode(word)
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            nxt = _sample(logits, temperature, top_k, top_p, generator)
            ids.append(nxt)
            if nxt == eos:
                break
        text = tokens.tokenizer.decode(ids, skip_special_tokens=True)
        out.append(text.replace("{", " ").replace("}", " ") + ". " + SUBJECT_SLOT)
    return out


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    scores = logits.double() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def template_weights(templates: Sequence[str]) -> list[float]:
    """Per-template weights of the key average (§3.2): the bare template ½, the generated ones share ½
    (the reference's mean of group means). A bare-only list weighs 1.
    """
    if len(templates) == 1:
        return [1.0]
    rest = 0.5 / (len(templates) - 1)
    return [0.5] + [rest] * (len(templates) - 1)
