"""A checkpoint directory for the residual step, so a killed edit resumes where it stopped.

The directory holds ``run.json`` (a fingerprint of everything the residuals depend on, and the context
templates) and one safetensors file per finished fact (δ, h and its stats). A rerun with another model,
other facts or other settings is refused instead of silently mixing two edits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from eamet._files import atomic_save_tensors, atomic_write
from eamet.errors import CacheError
from eamet.residuals import FactStats

__all__ = ["ResidualCheckpoint"]


class ResidualCheckpoint:
    """Per-fact residuals of an edit in progress.

    Args:
        root: the directory (created if needed).
        fingerprint: identifies the edit (:meth:`Editor._fingerprint`); a directory holding another one is
            refused with ``CacheError``.
        templates: the context templates of this run; a resumed run uses the stored ones instead
            (:attr:`templates`), so that template sampling never changes a resumed edit.
    """

    MANIFEST = "run.json"

    def __init__(self, root: Path, fingerprint: str, templates: list[str]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        manifest = root / self.MANIFEST
        if manifest.exists():
            try:
                stored = json.loads(manifest.read_text(encoding="utf-8"))
                templates_found = stored["templates"]
                if not isinstance(templates_found, list):
                    raise TypeError("templates is not a list")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CacheError(
                    f"{manifest}: not a checkpoint manifest of eamet ({exc})", path=str(manifest)
                ) from exc
            if stored.get("fingerprint") != fingerprint:
                raise CacheError(
                    f"{root} holds the checkpoint of a different edit (model, facts or settings differ); "
                    "use another checkpoint_dir or empty this one",
                    path=str(root),
                )
            self.templates: list[str] = [str(t) for t in templates_found]
        else:
            self.templates = templates
            text = json.dumps({"fingerprint": fingerprint, "templates": templates})
            atomic_write(manifest, lambda tmp: _write_text(tmp, text))

    def path(self, i: int) -> Path:
        """The file of fact ``i``."""
        return self.root / f"fact-{i:07d}.safetensors"

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, FactStats] | None:
        """Fact ``i``'s ``(delta, h, stats)``, or ``None`` if it is not saved (or not readable)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(i)
        if not path.exists():
            return None
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                stats = FactStats(**json.loads((handle.metadata() or {})["stats"]))
                return handle.get_tensor("delta"), handle.get_tensor("h"), stats
        except (SafetensorError, KeyError, TypeError, json.JSONDecodeError):
            return None  # written atomically, so only a foreign file lands here: recompute it

    def save(self, i: int, delta: torch.Tensor, h: torch.Tensor, stats: FactStats) -> None:
        """Saves fact ``i``'s (d,) residual δ and hidden state h with its stats, atomically."""
        atomic_save_tensors(self.path(i), {"delta": delta, "h": h}, {"stats": json.dumps(stats.to_dict())})


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
