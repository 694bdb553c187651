"""Which settings eamet edits a model with: one rule for the ``Editor``, the command line and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eamet.base.errors import ParameterError
from eamet.base.presets import PRESETS
from eamet.base.settings import EditConfig, Method
from eamet.models.catalog import KnownModel, resolve
from eamet.models.loader import known_model_of

__all__ = ["config_for", "known_by_name"]


def known_by_name(name: str) -> KnownModel | None:
    """The known model called ``name`` (``"smollm2"``), or ``None`` for a path that exists or a hub id."""
    if Path(name).exists():
        return None  # an existing local path always wins over a known name
    try:
        return resolve(name)
    except ParameterError:
        return None


def config_for(model: Any, method: Method = "eamet", *, name: str | None = None) -> EditConfig:
    """The settings for editing ``model`` with ``method``: the preset of a model eamet knows — named
    ``name`` (the CLI's ``--model``), or recognised by :func:`eamet.models.known_model_of` — corpus for C
    included (e.g. ``smollm2-135m``: ``model:200``, no hub), else :meth:`EditConfig.for_model`."""
    known = known_by_name(name) if name is not None else None
    known = known or known_model_of(model)
    if known is not None and known.name in PRESETS:
        return EditConfig.preset(known.name, method)
    return EditConfig.for_model(model, method)
