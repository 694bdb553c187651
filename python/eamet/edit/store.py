"""A residual store: each fact's residual δ, kept under a key made of exactly what it depends on.

The residual step is ≥ 97 % of an edit's time; the solve that turns residuals into weights is seconds. A
store lets any later edit reuse every residual it already holds: another λ, another first block, another
corpus for C, a prefix of a longer fact list, or the same edit resumed after it was killed.

What a residual depends on (the *key*, a SHA-256 over canonical JSON):

* the *base*: every weight of the model, the tokenizer and its BOS behaviour, the context templates, the
  last edited block l* and every setting of the residual step (:func:`residual_settings`; not λ, the
  solver, the corpus for C, the earlier edited blocks or settings that only change speed), the compute
  dtype, and :data:`RESIDUAL_VERSION`;
* the fact (prompt, subject, target);
* when the alignment terms are on (EAMET), everything before it that its alignment sees: the facts and
  stored residuals of the earlier batches (a running digest, :class:`KeyChain`) and, inside its own
  batch, the facts before it and ``batch_alignment``. So a store serves any prefix of a longer run that
  ends at a batch boundary, with the same ``fact_batch``.

Entries are written atomically (a temporary file renamed into place), so concurrent writers of the same
key leave one whole entry; each entry records its key and a SHA-256 of its tensors, and one that does not
match (damaged, foreign) is treated as absent and recomputed. A store that cannot be written raises
``CacheError`` naming the path before the edit changes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eamet.base.errors import CacheError
from eamet.base.facts import Fact
from eamet.base.files import atomic_write
from eamet.base.settings import SOLVE_SETTINGS, EditConfig
from eamet.edit.residual_records import FactStats
from eamet.model.parts import tensor_sha256
from eamet.model.tensor_files import atomic_save_tensors

__all__ = [
    "RESIDUAL_VERSION",
    "KeyChain",
    "ResidualStore",
    "StoredResidual",
    "residual_settings",
    "template_key",
]

RESIDUAL_VERSION = 1
"""The residual step's maths, as far as stored residuals go: bump it when a change alters the residuals
that the same inputs produce (including a changed default of an ``EditConfig`` field), so that stores
made before are not reused."""

STORE_FORMAT = 1
_ABSENT = object()
_MARKER = "eamet-residual-store.json"

# Settings that never change a residual: the solve (λ, solver, C, earlier blocks), the method's name (its
# settings count), the batch layout (encoded in the keys themselves where it matters), speed-only switches,
# and the template sampler (the templates themselves are hashed).
_NOT_RESIDUAL = frozenset(
    {
        *SOLVE_SETTINGS,
        "method",
        "fact_batch",
        "batch_alignment",
        "z_dtype",
        "z_forward",
        "z_chunk_tokens",
        "template_seeds",
        "template_length",
        "template_temperature",
        "template_top_k",
        "template_top_p",
        "seed",
    }
)


def residual_settings(config: EditConfig) -> dict[str, Any]:
    """The settings a residual depends on: every field of ``config`` but those of the solve, the batch
    layout, speed and template sampling, plus ``last_layer`` (l*, where the residuals live).

    Fields at their dataclass default are left out, so that a setting added later, whose default keeps
    the old behaviour, leaves every stored key valid (a change of a default is a change of the maths:
    it bumps :data:`RESIDUAL_VERSION`)."""
    defaults = EditConfig().to_dict()
    settings = {
        k: v for k, v in config.to_dict().items() if k not in _NOT_RESIDUAL and v != defaults.get(k, _ABSENT)
    }
    settings["last_layer"] = config.layers[-1]
    return settings


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fact_id(fact: Fact) -> list[str]:
    # target_true and case_id are labels for evaluation: they do not change the residual.
    return [fact.prompt, fact.subject, fact.target]


class KeyChain:
    """The store keys of an edit's facts, batch by batch.

    Args:
        base: digest of everything every residual of this edit depends on (:meth:`ResidualStore.base`).
        facts: the facts in editing order.
        aligned: whether a residual depends on the earlier ones (the alignment terms are on).
        batch_alignment: ``config.batch_alignment`` (what a fact sees of the earlier facts of its batch).
    """

    def __init__(self, base: str, facts: Sequence[Fact], *, aligned: bool, batch_alignment: str) -> None:
        self.base, self.facts = base, list(facts)
        self.aligned, self.batch_alignment = aligned, batch_alignment
        self._prefix = _digest("prefix", base)  # the facts and residuals of every finished batch
        self._done = 0

    def keys(self, batch: range) -> list[str]:
        """The keys of the facts of ``batch``, the next batch after those :meth:`advance` was told of."""
        if batch.start != self._done:
            raise ValueError(f"batch {batch} is not the next one (facts 0..{self._done - 1} are done)")
        if not self.aligned:
            return [_digest("fact", self.base, _fact_id(self.facts[i])) for i in batch]
        keys = []
        for i in batch:
            # Inside a batch a fact sees the earlier facts of the batch only while they are optimised.
            inside = [_fact_id(self.facts[j]) for j in range(batch.start, i + 1)]
            mode = self.batch_alignment if len(inside) > 1 else None
            keys.append(_digest("aligned", self._prefix, inside, mode))
        return keys

    def advance(self, batch: range, deltas: torch.Tensor) -> None:
        """Records the finished ``batch`` and its (B, d) residuals: later facts' keys depend on them."""
        if self.aligned:
            rows = [[_fact_id(self.facts[i]), tensor_sha256(d)] for i, d in zip(batch, deltas, strict=True)]
            self._prefix = _digest("prefix", self._prefix, rows)
        self._done = batch.stop


@dataclass
class StoredResidual:
    """One fact's entry: δ and h ((d,) float32, block l*'s output at the bare prompt) and its stats."""

    delta: torch.Tensor
    hidden: torch.Tensor
    stats: FactStats


class ResidualStore:
    """A directory of residuals, shared by any number of edits and processes.

    Args:
        root: the directory; created (with a marker file) if it does not exist. A non-empty directory
            without the marker is refused with ``CacheError``, so a store never writes into a folder of
            something else.

    Layout: ``eamet-residual-store.json`` (the marker), ``residuals/<2 hex>/<key>.safetensors`` (one entry
    per fact), ``templates/<key>.json`` (the context templates first used for a model and sampler, so an
    unseeded sampler gives a store's later edits the same templates).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        marker = self.root / _MARKER
        try:
            if marker.exists():
                stored = json.loads(marker.read_text(encoding="utf-8"))
                found = stored.get("format") if isinstance(stored, dict) else None
                if found != STORE_FORMAT:
                    raise CacheError(
                        f"{marker}: a residual store of format {found!r}; this eamet reads format "
                        f"{STORE_FORMAT}",
                        path=str(marker),
                    )
                return
            if self.root.exists() and any(self.root.iterdir()):
                raise CacheError(
                    f"{self.root} is not empty and not a residual store; give an empty or new directory",
                    path=str(self.root),
                )
            self._write(marker, json.dumps({"format": STORE_FORMAT, "kind": "eamet residual store"}))
        except json.JSONDecodeError as exc:
            raise CacheError(f"{marker}: not a residual store marker ({exc})", path=str(marker)) from exc
        except NotADirectoryError as exc:
            raise CacheError(f"{self.root}: not a directory", path=str(self.root)) from exc

    def __repr__(self) -> str:
        return f"ResidualStore({str(self.root)!r})"

    # -- keys ------------------------------------------------------------------------------------------

    @staticmethod
    def base(
        *,
        model_fingerprint: str,
        tokenizer_fingerprint: str,
        tokens: dict[str, Any],
        templates: Sequence[str],
        config: EditConfig,
        compute_dtype: torch.dtype,
    ) -> str:
        """The digest every key of one edit starts from (see the module's docstring)."""
        return _digest(
            "base",
            RESIDUAL_VERSION,
            model_fingerprint,
            tokenizer_fingerprint,
            tokens,
            list(templates),
            residual_settings(config),
            str(compute_dtype),
        )

    # -- entries ---------------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The file of the entry ``key``."""
        return self.root / "residuals" / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> StoredResidual | None:
        """The entry ``key``, or ``None`` if there is none or it is damaged (a warning names the file;
        the caller recomputes it and :meth:`put` replaces it)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(key)
        if not path.exists():
            return None
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                delta, hidden = handle.get_tensor("delta"), handle.get_tensor("hidden")
            if meta.get("key") != key:
                raise ValueError("it holds another key")
            if meta.get("sha256") != _tensors_sha256(delta, hidden):
                raise ValueError("its tensors do not match their SHA-256")
            stats = FactStats(**json.loads(meta["stats"]))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"{path}: damaged residual store entry, recomputing it ({exc})", stacklevel=3)
            return None
        return StoredResidual(delta=delta, hidden=hidden, stats=stats)

    def put(self, key: str, delta: torch.Tensor, hidden: torch.Tensor, stats: FactStats) -> None:
        """Saves one fact's (d,) δ, h and stats under ``key``, atomically. ``CacheError`` (naming the
        file) when it cannot be written (full disk, no permission)."""
        delta, hidden = delta.detach().float().cpu().contiguous(), hidden.detach().float().cpu().contiguous()
        meta = {
            "key": key,
            "sha256": _tensors_sha256(delta, hidden),
            "stats": json.dumps(stats.to_dict()),
            "residual_version": str(RESIDUAL_VERSION),
        }
        path = self.path(key)
        try:
            atomic_save_tensors(path, {"delta": delta, "hidden": hidden}, meta)
        except OSError as exc:
            raise CacheError(f"{path}: cannot write to the residual store ({exc})", path=str(path)) from exc

    def __len__(self) -> int:
        """The number of entries."""
        folder = self.root / "residuals"
        return sum(1 for _ in folder.glob("*/*.safetensors")) if folder.exists() else 0

    # -- templates -------------------------------------------------------------------------------------

    def templates(self, key: str, sample: Callable[[], list[str]]) -> list[str]:
        """The templates stored under ``key`` (a digest of the model, tokenizer and sampler), else
        ``sample()``'s, which are stored there. Seeded samplers give the same templates either way (and
        none is sampled again); an unseeded one gives every edit through this store the first one's."""
        path = self.root / "templates" / f"{key}.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(stored, list) and all(isinstance(t, str) for t in stored):
                    return stored
            except (OSError, json.JSONDecodeError):
                pass
            warnings.warn(f"{path}: damaged templates entry, replacing it", stacklevel=3)
        sampled = sample()
        self._write(path, json.dumps(sampled, ensure_ascii=False))
        return sampled

    def _write(self, path: Path, text: str) -> None:
        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        try:
            atomic_write(path, write)
        except OSError as exc:
            raise CacheError(f"{path}: cannot write to the residual store ({exc})", path=str(path)) from exc


def _tensors_sha256(delta: torch.Tensor, hidden: torch.Tensor) -> str:
    return _digest(tensor_sha256(delta), tensor_sha256(hidden))


def template_key(
    *, model_fingerprint: str, tokenizer_fingerprint: str, tokens: dict[str, Any], config: EditConfig
) -> str:
    """The key of the templates an edit samples: the model, the tokenizer and the sampler's settings."""
    sampler = {k: v for k, v in config.to_dict().items() if k.startswith("template_") or k in ("seed", "bos")}
    return _digest("templates", model_fingerprint, tokenizer_fingerprint, tokens, sampler)
