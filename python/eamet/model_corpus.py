"""Text sampled from the model itself, as a corpus for C = E[k kᵀ] where no other text is at hand.

``corpus="model:<n>"`` (or ``EditConfig.mom2_dataset``) asks for n documents: each starts with one of a
few common words (cycled, so the documents do not all open alike) and continues with up to
:data:`DOCUMENT_TOKENS` tokens sampled from the unedited model (temperature 1, top-p 0.95), seeded with a
private RNG state so the caller's is left alone. Sampling is slow on CPU (1000 documents from SmolLM2-135M:
about 15-25 minutes on 2 cores), so the texts are cached — in a ``corpora`` folder beside the covariance
statistics they feed (``$EAMET_CACHE_DIR/stats/corpora`` by default; ``$EAMET_CACHE_DIR/corpora`` when
:func:`sample_texts` is called without a root) — keyed by every weight of the model, the tokenizer, n, the
length, the seed and the sampling settings, and written atomically with checksums.

C only needs texts whose keys look like those the model sees; the model's own samples are exactly that
for the model's own distribution, though not for a particular domain (docs/benchmarks.md compares them
with the edit cases' own texts).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eamet._files import cache_dir, read_checked_dir, write_checked_dir
from eamet._progress import progress_bar
from eamet.errors import CacheError, CorpusError
from eamet.parts import eval_mode
from eamet.tokens import TokenAdapter

__all__ = ["DOCUMENT_TOKENS", "PREFIX", "model_corpus_size", "sample_texts"]

PREFIX = "model:"
DOCUMENT_TOKENS = 128
_MANIFEST = "corpus.json"
_TEXTS = "texts.jsonl"
_FORMAT = 1
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


def corpus_key(model_fingerprint: str, tokens: TokenAdapter, n: int, seed: int) -> dict[str, Any]:
    """Everything the sampled texts depend on (their cache key)."""
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
    }


def sample_texts(
    model: nn.Module,
    tokens: TokenAdapter,
    n: int,
    *,
    model_fingerprint: str,
    seed: int = 0,
    batch_size: int = 64,
    root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[str]:
    """``n`` documents sampled from ``model`` (see the module docstring), from the cache when a valid
    entry exists, else generated and cached.

    Args:
        model, tokens: the unedited model and its tokenisation.
        n: documents; model_fingerprint: a hash of every weight (``covariance.model_fingerprint``).
        seed: the sampling seed; batch_size: documents generated together.
        root: the cache folder (default ``$EAMET_CACHE_DIR/corpora``).
    """
    key = corpus_key(model_fingerprint, tokens, n, seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    entry = cache_dir("corpora", root) / f"model-{n}-{digest}"
    if (entry / _MANIFEST).is_file():
        try:
            read_checked_dir(entry, _MANIFEST, (_TEXTS,), lambda found: _same_key(found, key, entry))
            with (entry / _TEXTS).open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle]
        except (CacheError, json.JSONDecodeError):
            pass  # damaged or foreign: sampled again below
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
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise CorpusError("corpus 'model:<n>' needs a model with .generate (a Hugging Face causal LM)")
    device = next(model.parameters()).device
    eos = tokens.tokenizer.eos_token_id
    texts: list[str] = []
    devices = [device] if device.type == "cuda" else []
    bar = progress_bar(total=n, desc=f"sampling {n} documents for C", unit="doc", enabled=progress)
    with bar as shown, eval_mode(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            opening = tokens.encode(OPENINGS[(start // batch_size) % len(OPENINGS)])
            inputs = torch.tensor([opening] * count, device=device)
            out = generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=True,
                max_new_tokens=DOCUMENT_TOKENS,
                pad_token_id=tokens.pad_id,
                **SAMPLING,
            )
            for row in out.tolist():
                new = row[len(opening) :]
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                texts.append(str(tokens.tokenizer.decode(opening + new, skip_special_tokens=True)))
            shown.update(count)
    return texts
