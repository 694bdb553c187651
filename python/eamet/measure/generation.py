"""Generation for evaluation (algorithm.md §8.4): the prefixes prepended to every evaluation prompt (sampled
once from the unedited model), greedy continuations, and the n-gram entropy that scores their fluency."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn

from eamet.base.errors import ParameterError
from eamet.base.facts import SUBJECT_SLOT
from eamet.model.templates import generate_templates
from eamet.model.tokens import TokenAdapter

__all__ = [
    "EVAL_PREFIX_SEEDS",
    "MAX_GENERATION_PROMPT_TOKENS",
    "check_prefixes",
    "evaluation_prefixes",
    "greedy_texts",
    "ngram_entropy",
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


@torch.no_grad()
def greedy_texts(
    model: nn.Module,
    tokens: TokenAdapter,
    prompts: Sequence[str],
    *,
    new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    use_generate: bool | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (each encoded with the BOS policy and truncated to its first
    256 tokens, as the reference), decoded together with the prompt, special tokens skipped.

    Prompts are batched by exact token length, so no sequence is padded and positions are those of an
    unbatched run on every architecture. Generation stops at EOS (the rest of the row is dropped).
    ``model.generate(do_sample=False)`` (with its KV cache) is used when the model has it, else a
    cache-free arg-max loop; ``use_generate`` forces one or the other.

    Returns ``len(prompts)`` texts, in input order.
    """
    if not prompts:
        return []
    encoded = [tokens.encode(p)[:MAX_GENERATION_PROMPT_TOKENS] for p in prompts]
    for row, seq in enumerate(encoded):
        if not seq:
            raise ParameterError(f"generation prompt {row} ({prompts[row]!r}) encodes to no tokens")
    if use_generate is None:
        use_generate = callable(getattr(model, "generate", None))
    device = next(model.parameters()).device
    eos = tokens.tokenizer.eos_token_id
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(encoded):
        by_length.setdefault(len(seq), []).append(i)
    texts = [""] * len(prompts)
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            inputs = torch.tensor([encoded[i] for i in batch], dtype=torch.long, device=device)
            if use_generate:
                generate: Callable[..., torch.Tensor] = getattr(model, "generate")  # noqa: B009
                out = generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokens.pad_id,
                    return_dict_in_generate=False,
                )
            else:
                out = inputs
                for _ in range(new_tokens):
                    logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
                    out = torch.cat([out, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
                    if eos is not None and bool((out[:, length:] == eos).any(dim=1).all()):
                        break
            for row, i in enumerate(batch):
                new = out[row, length:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                texts[i] = str(tokens.tokenizer.decode(encoded[i] + new, skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(batch))
    return texts


def check_prefixes(prefixes: Sequence[str]) -> list[str]:
    if isinstance(prefixes, str):
        raise ParameterError("prefixes must be a list of strings, not one string", argument="prefixes")
    out = list(prefixes)
    if not out or not all(isinstance(p, str) for p in out):
        raise ParameterError(
            f"prefixes must be a non-empty list of strings ([''] for none), got {prefixes!r}",
            argument="prefixes",
        )
    return out


# Words and single punctuation marks: a dependency-free stand-in for NLTK's word_tokenize (which the
# reference calls); they differ on contractions ("don't" -> "don", "'", "t" here, "do", "n't" in NLTK).
_WORDS = re.compile(r"\w+|[^\w\s]")


# The reference truncates generation inputs to this many tokens (algorithm.md §8.3).
MAX_GENERATION_PROMPT_TOKENS = 256
