"""Loading a Hugging Face model and tokenizer for the command line (real ``from_pretrained`` paths)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from eamet.base.choices import DTYPES
from eamet.base.errors import MissingDependencyError, ParameterError

__all__ = ["load_model"]


def load_model(name: str, *, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a hub id, a local directory or a known model name (``"smollm2-135m"``,
    see :func:`eamet.models.known_models`), in eval mode on ``device``.

    An existing local path always wins over a known name. ``dtype`` is the weights' dtype (the reference
    loads float32; bfloat16 halves memory, see docs/differences.md). ``device`` defaults to CUDA when
    available. A name that is none of these, not in the Hugging Face cache, and cannot be looked up
    because the hub does not answer (or ``HF_HUB_OFFLINE`` is set) is a ``ParameterError`` naming the
    known models, within seconds.
    """
    if dtype not in DTYPES:
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", argument="dtype")
    if not Path(name).exists():
        from eamet import models

        try:
            known = models.resolve(name)
        except ParameterError:
            pass  # not a known name: a hub id
        else:
            return models.load(known, dtype=dtype, device=device)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError(f"loading a model needs torch and transformers ({exc})") from exc
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    local = Path(name).exists() or _in_hub_cache(name)
    if not local and not _hub_reachable():
        from eamet import models

        listed = ", ".join(models.known_models())
        raise ParameterError(
            f"model {name!r} is not a local directory, not a model eamet knows ({listed}), not in the "
            "Hugging Face cache, and the hub cannot be reached to download it",
            argument="model",
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    model: Any = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    return model, tokenizer


def _in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds a config of the hub id ``name`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repository id
        return False
    return isinstance(found, str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection within ``timeout`` seconds (never with ``HF_HUB_OFFLINE``
    set): a quick answer for a name that is not on this machine, where the hub client retries for a
    minute before it fails."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True
