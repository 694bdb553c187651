"""C_l = E[k kᵀ] of the rewrite module's input over a text corpus (algorithm.md §6.3), cached on disk.

Every non-padding token of every document counts. On CPU the batches go to the Rust ``SecondMoment``
(float64 sums of float32 products, GIL released, so a background thread updates while the next forward
runs); on an accelerator the sum is kept on the device. Several layers are collected in one pass.

A cache file is a ``SecondMoment`` safetensors file whose metadata holds every setting that changes the
result; its name carries a hash of them. A file that is corrupt, or whose settings differ, is rebuilt,
never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eamet.base.errors import CacheError
from eamet.base.files import cache_dir
from eamet.base.progress import progress_bar
from eamet.edit.corpus import Corpus, load_corpus
from eamet.edit.model_corpus import corpus_key, model_corpus_size, sample_texts
from eamet.kernels.second_moment import SecondMoment
from eamet.model.batching import length_sorted_batches, pad_right
from eamet.model.device import solve_device
from eamet.model.fingerprint import model_fingerprint, model_source
from eamet.model.hooks import by_position, record_inputs, run_until
from eamet.model.parts import ModelParts, eval_mode
from eamet.model.tokens import TokenAdapter

__all__ = ["SecondMomentCollector", "default_cache_dir"]

CACHE_FORMAT = 1
CORPUS_SEED = 0  # the sampling seed of "model:<n>" corpora


# Metadata that describes a cache file without being part of its key.
_RECORD_ONLY = ("tokens", "source")


class SecondMomentCollector:
    """Collects (or loads from cache) C = E[k kᵀ] for the rewrite modules of some layers.

    Args:
        model, parts, tokens: the model, its resolved modules, the tokenisation (its BOS policy counts).
        corpus: see :func:`load_corpus`.
        n_samples: documents to read; max_length: tokens kept per document.
        dtype: ``"float32"`` (products in float32, sums in float64, as the reference) or ``"float64"``.
        cache_dir: where statistics are cached (default :func:`default_cache_dir`); ``None`` for no cache
            only via ``use_cache=False``.
        batch_tokens: padded tokens per forward (speed and memory only; not part of the cache key).
        progress: show a tqdm bar over tokens, with ETA.
    """

    def __init__(
        self,
        model: nn.Module,
        parts: ModelParts,
        tokens: TokenAdapter,
        *,
        corpus: Corpus,
        n_samples: int,
        max_length: int,
        dtype: str = "float32",
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        batch_tokens: int = 8192,
        progress: bool = True,
    ) -> None:
        self.model, self.parts, self.tokens = model, parts, tokens
        self.corpus, self.n_samples, self.max_length, self.dtype = corpus, n_samples, max_length, dtype
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_cache, self.batch_tokens, self.progress = use_cache, batch_tokens, progress
        self._loaded: tuple[str, list[str]] | None = None
        self._sampled = model_corpus_size(corpus)  # n of a "model:<n>" corpus, else None
        self._model_print: str | None = None

    def _file_corpus(self) -> tuple[str, list[str]]:
        if self._loaded is None:
            self._loaded = load_corpus(self.corpus, self.n_samples)
        return self._loaded

    def corpus_id(self) -> str:
        """An id of the corpus that changes whenever its texts do. For ``"model:<n>"`` it is a hash of the
        sampling settings and every weight, so cached statistics are found without sampling anything."""
        if self._sampled is None:
            return self._file_corpus()[0]
        key = corpus_key(self._whole_model(), self.tokens, self._sampled, CORPUS_SEED)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return f"model:{self._sampled}:sha256:{digest}"

    def _whole_model(self) -> str:
        if self._model_print is None:
            self._model_print = model_fingerprint(self.model, self.parts)
        return self._model_print

    def texts(self) -> list[str]:
        """The corpus's first ``n_samples`` documents (sampling a ``"model:<n>"`` corpus, or reading its
        cache, on first use)."""
        if self._sampled is None:
            return self._file_corpus()[1]
        texts = sample_texts(
            self.model,
            self.tokens,
            self._sampled,
            model_fingerprint=self._whole_model(),
            seed=CORPUS_SEED,
            root=self.cache_dir / "corpora",
            progress=self.progress,
        )
        return texts[: self.n_samples]

    def settings(self, layer: int, corpus_id: str) -> dict[str, Any]:
        """Everything that changes C at ``layer``; stored in the cache file and hashed into its name."""
        return {
            "format": CACHE_FORMAT,
            "model": model_fingerprint(self.model, self.parts, layer),
            "model_type": self.parts.model_type,
            "layer": layer,
            "module": self.parts.spec.rewrite_path(layer),
            "corpus": corpus_id,
            "n_samples": self.n_samples,
            "max_length": self.max_length,
            "bos_prefix": self.tokens.prefix,
            "tokenizer": self.tokens.fingerprint(),
            "dtype": self.dtype,
        }

    def cache_path(self, settings: dict[str, Any]) -> Path:
        """The cache file of ``settings`` (or of a collected moment's ``metadata``, which adds records)."""
        keyed = {k: v for k, v in settings.items() if k not in _RECORD_ONLY}
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]
        return self.cache_dir / f"{settings['model_type']}-layer{settings['layer']}-{key}.safetensors"

    def moments(self, layers: Sequence[int]) -> dict[int, SecondMoment]:
        """C for each layer: from the cache when a valid file exists, else collected in one pass over the
        corpus (and cached). The returned accumulators' ``metadata`` holds their settings.
        """
        corpus_id = self.corpus_id()
        wanted = {layer: self.settings(layer, corpus_id) for layer in layers}
        found: dict[int, SecondMoment] = {}
        for layer, settings in wanted.items():
            cached = self._load(settings) if self.use_cache else None
            if cached is not None:
                found[layer] = cached
        missing = [layer for layer in layers if layer not in found]
        if missing:
            collected = self._collect(missing, self.texts())
            for layer, acc in collected.items():
                acc.metadata = {**wanted[layer], "tokens": acc.count, "source": model_source(self.model)}
                if self.use_cache:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    acc.save(self.cache_path(wanted[layer]))
                found[layer] = acc
        return found

    def _load(self, settings: dict[str, Any]) -> SecondMoment | None:
        path = self.cache_path(settings)
        if not path.exists():
            return None
        try:
            acc = SecondMoment.load(path)
        except CacheError as exc:
            warnings.warn(f"rebuilding a corrupt statistics cache: {exc}", stacklevel=3)
            return None
        stored = {k: v for k, v in acc.metadata.items() if k not in _RECORD_ONLY}
        if stored != json.loads(json.dumps(settings)):
            warnings.warn(f"rebuilding {path}: it was made with different settings", stacklevel=3)
            return None
        return acc

    @torch.no_grad()
    def _collect(self, layers: list[int], texts: list[str]) -> dict[int, SecondMoment]:
        device = self.parts.device
        # Accumulate on an accelerator with float64 (CUDA); on the CPU and on MPS, in the Rust core.
        on_device = device.type != "cpu" and solve_device(device) == device
        cast = torch.float64 if self.dtype == "float64" else torch.float32
        docs = [self.tokens.encode(t)[: self.max_length] for t in texts]
        docs = [d for d in docs if d]
        lengths = [len(d) for d in docs]
        modules = {layer: self.parts.rewrite(layer) for layer in layers}
        dims = {layer: self.parts.key_dim(layer) for layer in layers}
        sums = {
            layer: torch.zeros((dims[layer],) * 2, dtype=torch.float64, device=device) for layer in layers
        }
        accs = {layer: SecondMoment(dims[layer]) for layer in layers}
        count = 0
        store: dict[Any, torch.Tensor] = {}
        pending: Future[None] | None = None
        stop_at = self.parts.block(max(layers))
        bar = progress_bar(
            total=sum(lengths), desc=f"C = E[kkᵀ] layers {layers}", unit="tok", enabled=self.progress
        )
        with (
            bar as shown,
            eval_mode(self.model),
            ThreadPoolExecutor(max_workers=1) as pool,
            record_inputs(modules, store),
        ):
            for batch in length_sorted_batches(lengths, max_items=1 << 16, max_tokens=self.batch_tokens):
                inputs = pad_right([docs[i] for i in batch], self.tokens.pad_id, device)
                run_until(self.model, stop_at, **inputs)
                mask = inputs["attention_mask"].bool()
                rows = {layer: by_position(store[layer], *mask.shape)[mask].to(cast) for layer in layers}
                if on_device:
                    for layer, x in rows.items():
                        sums[layer] += (x.T @ x).to(torch.float64)
                else:
                    if pending is not None:
                        pending.result()
                    host = {k: v.cpu().numpy() for k, v in rows.items()}
                    pending = pool.submit(_update_all, accs, host)
                count += int(mask.sum())
                shown.update(int(mask.sum()))
            if pending is not None:
                pending.result()
        if on_device:
            accs = {
                layer: SecondMoment.from_sum(sums[layer].cpu().numpy(), count, input_dtype=self.dtype)
                for layer in layers
            }
        return accs


def _update_all(accs: dict[int, SecondMoment], rows: dict[int, Any]) -> None:
    for layer, x in rows.items():
        accs[layer].update(x)


def default_cache_dir() -> Path:
    """``$EAMET_CACHE_DIR/stats``, else ``~/.cache/eamet/stats``."""
    return cache_dir("stats")
