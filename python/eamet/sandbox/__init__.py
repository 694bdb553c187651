"""The sandbox: a world of facts to edit and the pocket model that has learned it.

``World`` is plain data (no torch): generated from a seed or read from CounterFact records. The pocket model
(:func:`pocket_model`) is a small transformers causal LM trained on a world — the default world's ships
with the package — and :func:`trace_subject` checks that it reads facts at the subject's last token.
In the layers (:mod:`eamet.base`) it sits above ``edit`` and ``measure``, below the command line.
"""

from __future__ import annotations

from typing import Any

from eamet.base.records import EditCase
from eamet.sandbox.world import DEFAULT_RELATIONS, Relation, World, WorldFact

__all__ = [
    "DEFAULT_RELATIONS",
    "EditCase",
    "PocketSettings",
    "Relation",
    "SubjectTrace",
    "TrainingReport",
    "World",
    "WorldFact",
    "default_world",
    "edit_config",
    "pocket_model",
    "recall",
    "trace_subject",
    "train_pocket",
    "world_corpus",
]

# The names below need torch; importing them on first use keeps ``eamet.sandbox.World`` torch-free.
_LAZY = {
    "PocketSettings": "eamet.sandbox.pocket",
    "TrainingReport": "eamet.sandbox.pocket",
    "default_world": "eamet.sandbox.pocket",
    "edit_config": "eamet.sandbox.pocket",
    "pocket_model": "eamet.sandbox.pocket",
    "recall": "eamet.sandbox.pocket",
    "train_pocket": "eamet.sandbox.pocket",
    "world_corpus": "eamet.sandbox.pocket",
    "SubjectTrace": "eamet.sandbox.tracing",
    "trace_subject": "eamet.sandbox.tracing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eamet.sandbox' has no attribute {name!r}")
