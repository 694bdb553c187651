"""Context templates (algorithm.md §2): short texts sampled from the unedited model, put before a prompt
so that keys and the residual hold up under different preceding contexts.

Unlike the reference, sampling is seeded (a private ``torch.Generator``, so the global RNG is left alone)
and written as a small loop rather than ``model.generate``: one sequence at a time, so no padding can
shift positions, on any architecture. The loop keeps the model's KV cache where its forward takes one
(one token per step instead of the whole text: SmolLM2's 13 templates in 13 s instead of 25 s, the same
texts; ``benches/bench_model_corpus.py --templates-only``) and runs the whole text again at every step
where it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from eamet.base.errors import UnsupportedArchitectureError
from eamet.base.facts import SUBJECT_SLOT
from eamet.model.hooks import cache_keyword
from eamet.model.tokens import TokenAdapter

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
        next_logits = _next_logits(model, ids, device)
        for _ in range(length):
            nxt = _sample(next_logits(), temperature, top_k, top_p, generator)
            ids.append(nxt)
            if nxt == eos:
                break
        text = tokens.tokenizer.decode(ids, skip_special_tokens=True)
        out.append(text.replace("{", " ").replace("}", " ") + ". " + SUBJECT_SLOT)
    return out


def _next_logits(model: nn.Module, ids: list[int], device: torch.device) -> Callable[[], torch.Tensor]:
    """A function giving the logits after ``ids`` (``[V]``, float32 on the CPU) each time it is called;
    the caller appends the sampled token to ``ids`` in between. With a KV cache each call runs one token."""
    keyword = cache_keyword(model)
    if keyword is None:
        return lambda: model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
    from transformers import DynamicCache

    cache = DynamicCache()
    seen = 0  # tokens of ``ids`` already in the cache

    def step() -> torch.Tensor:
        nonlocal seen
        new = torch.tensor([ids[seen:]], device=device)
        logits: torch.Tensor = model(input_ids=new, use_cache=True, **{keyword: cache}).logits[0, -1]
        seen = len(ids)
        if cache.get_seq_length() != seen:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} takes a KV cache but did not fill it: templates need a causal LM"
            )
        return logits.float().cpu()

    return step


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
