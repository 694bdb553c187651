"""Loading a Hugging Face model and tokenizer for the command line (real ``from_pretrained`` paths)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from eamet.errors import FactError, MissingDependencyError, ParameterError
from eamet.facts import Fact, check_facts

__all__ = ["DTYPES", "add_reference_pad_token", "load_facts", "load_model", "tokenizer_of"]

DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model can be loaded in


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


def tokenizer_of(model: Any) -> Any:
    """The tokenizer of ``model`` when none is given: the one :func:`eamet.models.load` returned with it,
    else ``AutoTokenizer.from_pretrained`` of the model's own ``config.name_or_path``.

    Raises ``ParameterError`` saying how to pass one when neither exists (a model built from a config has
    no ``name_or_path``; a hub id that cannot be reached offline fails too).
    """
    from eamet import models

    found = models.tokenizer_for(model)
    if found is not None:
        return found
    source = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    how = "pass the model's tokenizer: Editor(model, tokenizer)"
    if not source:
        raise ParameterError(f"the model does not say where it was loaded from; {how}", argument="tokenizer")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as exc:
        raise ParameterError(
            f"no tokenizer could be loaded from the model's name_or_path {source!r} ({exc}); {how}",
            argument="tokenizer",
        ) from exc


def load_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file (one record per line) or a JSON list, in any format :meth:`Fact.from_dict`
    reads. Raises ``FactError`` naming the line of a bad record.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    records: list[Any]
    if path.suffix == ".json":
        loaded = json.loads(text)
        records = loaded if isinstance(loaded, list) else [loaded]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FactError(f"{path}:{lineno}: not valid JSON ({exc.msg})", path=str(path)) from None
    return check_facts(records)


def add_reference_pad_token(model: Any, tokenizer: Any) -> None:
    """Reproduces the reference's pad handling (algorithm.md §1.2), for exact reproduction only.

    If the tokenizer has no pad token, adds ``[PAD]`` and grows the input and output embeddings by one
    row set to the mean of the existing rows. This changes the model's softmax (one more vocabulary entry)
    and cannot be undone by an ``EditResult``; eamet itself never needs it, as padding sits under the
    attention mask.
    """
    if tokenizer.pad_token is not None:
        return
    import torch

    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for matrix in (model.get_input_embeddings(), model.get_output_embeddings()):
            if matrix is not None:
                matrix.weight[-1] = matrix.weight[:-1].mean(dim=0)
