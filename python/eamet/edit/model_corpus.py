"""Text sampled from the model itself, as a corpus for C = E[k kᵀ] where no other text is at hand.

``corpus="model:<n>"`` (or ``EditConfig.mom2_dataset``) asks for n documents: each starts with one of a
few common words (cycled, so the documents do not all open alike) and continues with up to
:data:`DOCUMENT_TOKENS` tokens sampled from the unedited model (temperature 1, top-p 0.95: :func:`nucleus`),
seeded with a private generator so the caller's RNG is left alone. Documents are sampled
:data:`BATCH_SIZE` at a time with the model's KV cache; it is still one forward of the model per token,
about one document per second for SmolLM2-135M on 2 CPU cores (docs/benchmarks.md). So the texts are
cached — in a ``corpora`` folder beside the covariance statistics they feed
(``$EAMET_CACHE_DIR/stats/corpora`` by default; ``$EAMET_CACHE_DIR/corpora`` when :func:`sample_texts` is
called without a root) — keyed by every weight of the model, the tokenizer, n, the length, the seed and
the sampling settings, and written atomically with checksums.

C only needs texts whose keys look like those the model sees; the model's own samples are exactly that
for the model's own distribution, though not for a particular domain (docs/benchmarks.md compares them
with the edit cases' own texts).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eamet.base.errors import CacheError, CorpusError
from eamet.base.files import cache_dir, read_checked_dir, write_checked_dir
from eamet.base.progress import progress_bar, progress_note
from eamet.model.hooks import cache_keyword
from eamet.model.parts import eval_mode
from eamet.model.tokens import TokenAdapter

__all__ = ["DOCUMENT_TOKENS", "PREFIX", "model_corpus_size", "nucleus", "sample_nucleus", "sample_texts"]

PREFIX = "model:"
DOCUMENT_TOKENS = 128
BATCH_SIZE = 128  # documents sampled together (SmolLM2 on 2 cores: 0.90 docs/s at 64, 1.03 at 128)
_MANIFEST = "corpus.json"
_TEXTS = "texts.jsonl"
_FORMAT = 2  # 2: eamet's own batched sampler (sample_nucleus) instead of model.generate
# Openings, cycled over the documents: the model continues each into its own text.
OPENINGS = (
    "The",
    "In",
    "A",
    "It",
    "This",
    "He",
    "She",
    "We",
    "When",
    "After",
    "There",
    "One",
    "According",
    "During",
    "Many",
    "Born",
)
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 0}


def model_corpus_size(corpus: Any) -> int | None:
    """n of a ``"model:<n>"`` corpus, ``None`` for any other corpus; ``CorpusError`` for a malformed one."""
    if not (isinstance(corpus, str) and corpus.startswith(PREFIX)):
        return None
    text = corpus[len(PREFIX) :]
    if not text.isdigit() or int(text) < 1:
        raise CorpusError(f"corpus {corpus!r}: expected 'model:<n>' with n >= 1 documents")
    return int(text)


def corpus_key(
    model_fingerprint: str, tokens: TokenAdapter, n: int, seed: int, batch_size: int = BATCH_SIZE
) -> dict[str, Any]:
    """Everything the sampled texts depend on (their cache key): the batches decide which random numbers
    each document draws, so their size is part of it."""
    return {
        "format": _FORMAT,
        "model": model_fingerprint,
        "tokenizer": tokens.fingerprint(),
        "bos_prefix": tokens.prefix,
        "documents": n,
        "document_tokens": DOCUMENT_TOKENS,
        "openings": list(OPENINGS),
        "sampling": SAMPLING,
        "seed": seed,
        "batch_size": batch_size,
    }


def sample_texts(
    model: nn.Module,
    tokens: TokenAdapter,
    n: int,
    *,
    model_fingerprint: str,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[str]:
    """``n`` documents sampled from ``model`` (see the module docstring), from the cache when a valid
    entry exists, else generated and cached.

    Args:
        model, tokens: the unedited model and its tokenisation.
        n: documents; model_fingerprint: a hash of every weight
            (:func:`eamet.model.fingerprint.model_fingerprint`).
        seed: the sampling seed; batch_size: documents generated together.
        root: the cache folder (default ``$EAMET_CACHE_DIR/corpora``).
    """
    key = corpus_key(model_fingerprint, tokens, n, seed, batch_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    entry = cache_dir("corpora", root) / f"model-{n}-{digest}"
    if (entry / _MANIFEST).is_file():
        try:
            read_checked_dir(entry, _MANIFEST, (_TEXTS,), lambda found: _same_key(found, key, entry))
            with (entry / _TEXTS).open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle]
        except (CacheError, json.JSONDecodeError):
            pass  # damaged or foreign: sampled again below
    progress_note(
        f"C needs text the model reads, and the corpus is 'model:{n}': sampling {n} documents of up to "
        f"{DOCUMENT_TOKENS} tokens from the model once; they are cached in {entry}",
        progress,
    )
    texts = _generate(model, tokens, n, seed=seed, batch_size=batch_size, progress=progress)

    def fill(staging: Path) -> dict[str, Any]:
        with (staging / _TEXTS).open("w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(json.dumps(text) + "\n")
        return {"key": key}

    write_checked_dir(entry, fill, _MANIFEST)
    return texts


def _same_key(manifest: dict[str, Any], key: dict[str, Any], entry: Path) -> None:
    if manifest.get("key") != json.loads(json.dumps(key)):
        raise CacheError(f"{entry}: sampled with other settings", path=str(entry))


@torch.no_grad()
def _generate(
    model: nn.Module, tokens: TokenAdapter, n: int, *, seed: int, batch_size: int, progress: bool
) -> list[str]:
    """``n`` documents, ``batch_size`` at a time: one prefill of the batch's openings, then one cached
    forward per token for the whole batch (the KV cache, so each step costs one token per document).
    Document d opens with ``OPENINGS[d % len(OPENINGS)]``; documents whose openings are as many tokens
    long share batches (no padding, so no position is shifted)."""
    device = next(model.parameters()).device
    eos = tokens.tokenizer.eos_token_id
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    openings = [tokens.encode(OPENINGS[d % len(OPENINGS)]) for d in range(n)]
    by_length: dict[int, list[int]] = {}
    for d, opening in enumerate(openings):
        by_length.setdefault(len(opening), []).append(d)
    batches = [
        docs[start : start + batch_size]
        for _, docs in sorted(by_length.items())
        for start in range(0, len(docs), batch_size)
    ]
    texts = [""] * n
    # The bar counts documents and moves at every token (a batch's documents grow together), so its
    # rate and ETA are live from the first step rather than from the first finished batch.
    shape = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} docs [{elapsed}<{remaining}, {rate_fmt}]"
    bar = progress_bar(
        total=n, desc="sampling documents for C", unit="doc", enabled=progress, bar_format=shape
    )
    with bar as shown, eval_mode(model):
        for batch in batches:

            def advance(steps: int, count: int = len(batch)) -> None:
                shown.update(count * steps / DOCUMENT_TOKENS)

            prompt = torch.tensor([openings[d] for d in batch], device=device)
            rows = _continue(model, prompt, generator, eos, advance)
            for d, row in zip(batch, rows.tolist(), strict=True):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                texts[d] = str(tokens.tokenizer.decode(openings[d] + row, skip_special_tokens=True))
    return texts


def _continue(
    model: nn.Module,
    openings: torch.Tensor,
    generator: torch.Generator,
    eos: int | None,
    on_steps: Callable[[int], Any],
) -> torch.Tensor:
    """``[B, T]`` tokens sampled after ``openings`` (``[B, L]``, one opening: no padding), T ≤
    :data:`DOCUMENT_TOKENS`: the loop stops early once every row has sampled EOS (texts end there)."""
    from transformers import DynamicCache

    needs = "corpus 'model:<n>' needs a causal LM that fills transformers' KV cache"
    keyword = cache_keyword(model)
    if keyword is None:
        raise CorpusError(needs)
    cache = DynamicCache()
    out = model(input_ids=openings, use_cache=True, **{keyword: cache})
    if cache.get_seq_length() != openings.shape[1]:
        raise CorpusError(needs)
    sampled: list[torch.Tensor] = []
    ended = torch.zeros(openings.shape[0], dtype=torch.bool, device=openings.device)
    for step in range(DOCUMENT_TOKENS):
        nxt = sample_nucleus(out.logits[:, -1, :], SAMPLING["temperature"], SAMPLING["top_p"], generator)
        sampled.append(nxt)
        if eos is not None:
            ended |= nxt == eos
        if step + 1 == DOCUMENT_TOKENS or bool(ended.all()):
            on_steps(DOCUMENT_TOKENS - step)
            break
        on_steps(1)
        out = model(input_ids=nxt[:, None], use_cache=True, **{keyword: cache})
    return torch.stack(sampled, dim=1)


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of ``softmax(logits / temperature)`` (``logits``: ``[B, V]``): the most
    likely tokens, in order, while the mass before each is < ``top_p`` (transformers' top-p rule).

    Returns ``(weights, index)``, both ``[B, k]``: the tokens' probabilities (0 outside the nucleus) and
    their ids. The nucleus is found among the top k tokens, k growing 64, 256, … until their mass reaches
    ``top_p`` in every row, so the full sort over the vocabulary happens only where the distribution is
    that flat.
    """
    probs = (logits.float() / temperature).softmax(dim=-1)
    vocab = probs.shape[-1]
    k = min(64, vocab)
    while True:
        top, index = probs.topk(k, dim=-1)  # sorted, most likely first
        if k == vocab or bool((top.sum(dim=-1) >= top_p).all()):
            break
        k = min(4 * k, vocab)
    return torch.where(top.cumsum(dim=-1) - top < top_p, top, torch.zeros_like(top)), index


def sample_nucleus(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row of ``logits`` (``[B, V]`` → ``[B]``), from its :func:`nucleus`."""
    weights, index = nucleus(logits, temperature, top_p)
    choice = torch.multinomial(weights, 1, generator=generator)  # multinomial normalises the weights
    return index.gather(-1, choice).squeeze(-1)
