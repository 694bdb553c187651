"""Fingerprints of a model: which weights (and where they came from) a cached C or a stored residual
was computed from, so that a cache never serves another model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from eamet.model.parts import ModelParts

__all__ = ["model_fingerprint", "model_source"]


def model_fingerprint(model: nn.Module, parts: ModelParts, layer: int | None = None) -> str:
    """A SHA-256 of the weights (names, dtypes, shapes, bytes) that determine the keys at ``layer``.

    That is every parameter but those of later blocks, of ``layer``'s own rewrite module (an edit of
    it leaves its keys unchanged, so a second edit reuses the statistics), the final norm and the
    unembedding (unless tied to the input embedding). ``layer=None`` hashes every parameter. The weights
    are always hashed, never trusted by name: a hub model loaded in another dtype, resized or edited in
    memory is another model.
    """
    skip: set[int] = set()
    if layer is not None:
        downstream = [parts.rewrite(layer), parts.final_norm, parts.unembed]
        downstream += [parts.block(j) for j in range(layer + 1, parts.num_layers)]
        skip = {id(p) for module in downstream for p in module.parameters()}
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        if isinstance(embeddings, nn.Module):
            skip -= {id(p) for p in embeddings.parameters()}  # tied unembedding: still an input
    digest = hashlib.sha256()
    for pname, param in model.named_parameters():
        if id(param) in skip:
            continue
        data = param.detach().to("cpu").contiguous()
        digest.update(f"{pname}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def model_source(model: nn.Module) -> str | None:
    """``name_or_path@commit`` of a model loaded from the hub at a known revision (for the record)."""
    config = getattr(model, "config", None)
    name, commit = getattr(config, "name_or_path", ""), getattr(config, "_commit_hash", None)
    return f"{name}@{commit}" if name and commit else None
