"""``EditResult``: what an edit changed, as data and as a file, and the handle that applies or undoes it.

An edit file is one safetensors file: the factors of every layer's update, the residuals and the
misalignment arrays as tensors, and JSON metadata (facts, config, templates, stats, the SHA-256 of every
edited matrix before and after). Since format 2 the metadata also records a SHA-256 of every tensor and of
the metadata itself, and :meth:`EditResult.load` refuses a file whose contents do not match before any
weight is touched. Format 1 files (no checksums) still load, with a warning that they cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from eamet.base.arch import ArchSpec
from eamet.base.errors import CacheError, EametError, EditMismatchError
from eamet.base.facts import Fact
from eamet.base.settings import EditConfig
from eamet.edit.residual_records import FactStats
from eamet.edit.solve import LayerUpdate, apply_update
from eamet.kernels import __version__
from eamet.kernels.diagnostics import MisalignmentReport
from eamet.model.parts import ModelParts, WeightSnapshot, tensor_sha256
from eamet.model.tensor_files import atomic_save_tensors

__all__ = ["FILE_FORMAT", "EditResult", "FactOutcome", "WeightRecord"]

FILE_FORMAT = 2
"""2: a SHA-256 of every tensor and of the metadata (verified on load); 1: none (still read)."""
_READABLE_FORMATS = (1, 2)
_META_KEY, _META_SHA_KEY = "eamet", "eamet_sha256"


@dataclass
class WeightRecord:
    """Identity of one edited matrix before and after the edit (checked by ``apply`` and ``undo``)."""

    layer: int
    path: str
    shape: list[int]
    dtype: str
    original_sha256: str
    edited_sha256: str = ""

    @classmethod
    def of(cls, parts: ModelParts, layer: int) -> WeightRecord:
        """The record of ``layer``'s rewrite weight as it is now (``edited_sha256`` still empty)."""
        weight = parts.rewrite_weight(layer)
        return cls(
            layer,
            parts.spec.rewrite_path(layer),
            list(weight.shape),
            str(weight.dtype),
            tensor_sha256(weight),
        )


@dataclass(frozen=True)
class FactOutcome:
    """Whether one fact's edit landed, checked on the edited model at the fact's bare prompt.

    Attributes:
        landed: every token of the target is the greedy (arg-max) continuation of the bare prompt
            (strict efficacy of this one prompt).
        nll: the target's mean per-token negative log-likelihood there, after the edit.
        residual_nll: the residual step's final NLL (δ added at l*, over the context templates): what
            the update was asked to realise. A low ``residual_nll`` with a high ``nll`` is a fact the
            solve could not realise (λ, crowded keys: ``Editor.capacity``); a high ``residual_nll`` is a
            residual that never made the edit.
    """

    landed: bool
    nll: float
    residual_nll: float

    def to_dict(self) -> dict[str, Any]:
        return {"landed": self.landed, "nll": self.nll, "residual_nll": self.residual_nll}


@dataclass
class EditResult:
    """The outcome of :meth:`Editor.edit`: what was changed, how, and how to take it back.

    Attributes:
        facts: the edited facts, in editing order.
        config: the settings used; templates: the context templates (template 0 is the bare ``"{}"``).
        updates: one :class:`~eamet.edit.solve.LayerUpdate` per edited layer (low-rank factors of Δ).
        deltas: (N, d) float32 residuals δ_i at the last edited layer.
        stats: per fact, the optimisation's loss terms, steps, ‖δ‖, radius and seconds.
        misalignment: report of the last layer's unedited keys vs ``deltas`` (``eamet.misalignment``,
            support j ≠ i); ``None`` for a single fact or when a residual is exactly zero.
        weights: per edited matrix, its path, shape, dtype and SHA-256 before/after.
        arch: the model type and module paths the edit was made on.
        tokens: the tokenisation behaviour the edit was made with (BOS prefix, probes).
        model_fingerprint: SHA-256 of every weight of the unedited model (:meth:`Editor.resolve` checks it).
        outcomes: per fact, whether it landed (:class:`FactOutcome`; :meth:`not_landed`,
            :meth:`outcome_line`).
    """

    facts: list[Fact]
    config: EditConfig
    templates: list[str]
    updates: list[LayerUpdate]
    deltas: torch.Tensor
    stats: list[FactStats]
    misalignment: MisalignmentReport | None
    weights: list[WeightRecord]
    arch: dict[str, Any]
    tokens: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str = ""  # empty in files written before it was recorded
    outcomes: list[FactOutcome] = field(default_factory=list)  # empty in files written before them
    # The pre-edit weights while this result is applied to a model; undo() puts them back.
    _snapshot: WeightSnapshot | None = field(default=None, init=False, repr=False, compare=False)

    def not_landed(self) -> list[int]:
        """The indices of the facts whose edit did not land (empty if every one did, or if the result
        holds no outcomes)."""
        return [i for i, outcome in enumerate(self.outcomes) if not outcome.landed]

    def outcome_line(self, limit: int = 5) -> str:
        """One line: ``"3 facts: 2 landed, 1 did not: #2 'The Eiffel Tower' → 'London' (NLL 8.97)"``,
        naming at most ``limit`` of the facts that did not land."""
        if not self.outcomes:
            return f"{len(self.facts)} facts (no outcomes recorded)"
        missed = self.not_landed()
        line = f"{len(self.facts)} facts: {len(self.facts) - len(missed)} landed"
        if not missed:
            return line
        named = ", ".join(
            f"#{i} {self.facts[i].subject.strip()!r} → {self.facts[i].target.strip()!r} "
            f"(NLL {self.outcomes[i].nll:.2f})"
            for i in missed[:limit]
        )
        more = f" and {len(missed) - limit} more" if len(missed) > limit else ""
        return f"{line}, {len(missed)} did not: {named}{more}"

    @property
    def applied(self) -> bool:
        """Whether this result is currently applied to a model (and can be undone)."""
        return self._snapshot is not None

    def _applied_with(self, snapshot: WeightSnapshot) -> EditResult:
        """Marks the result as applied: ``snapshot`` holds the weights from before (the Editor's hand-off)."""
        self._snapshot = snapshot
        return self

    def undo(self) -> None:
        """Restores the edited matrices to their exact pre-edit values.

        Raises ``EditMismatchError`` if the result is not applied, or if the matrices changed since (undo
        later edits first: edits are undone in reverse order).
        """
        snapshot = self._snapshot
        if snapshot is None:
            raise EditMismatchError("this edit is not applied to a model")
        for record in self.weights:
            if tensor_sha256(snapshot.parts.rewrite_weight(record.layer)) != record.edited_sha256:
                raise EditMismatchError(
                    f"{record.path} changed since this edit was applied; undo later edits first"
                )
        try:
            snapshot.restore()
        finally:
            self._snapshot = None

    def apply(self, model: nn.Module) -> EditResult:
        """Applies this (e.g. loaded) edit to ``model`` in place and returns ``self``, now undoable.

        Refuses, with ``EditMismatchError`` and nothing changed, a model of another architecture, with
        other shapes or dtypes, or whose matrices are not the ones the edit was made on (SHA-256).
        """
        if self._snapshot is not None:
            raise EditMismatchError("this edit is already applied; undo it first")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self._check_model_type(model_type)
        parts = ModelParts(model, ArchSpec(**self.arch["spec"]))
        self.check_original(parts)
        with WeightSnapshot(parts, [r.layer for r in self.weights]) as snapshot:
            for update in self.updates:
                apply_update(parts.rewrite_weight(update.layer), update, parts.spec.weight_layout)
        for record in self.weights:
            if tensor_sha256(parts.rewrite_weight(record.layer)) != record.edited_sha256:
                warnings.warn(
                    f"{record.path}: re-applied weights differ in rounding from the original edit's "
                    "(another device's float64 arithmetic)",
                    stacklevel=2,
                )
                break
        return self._applied_with(snapshot)

    def check_original(self, parts: ModelParts) -> None:
        """Raises ``EditMismatchError`` unless ``parts``' model is one this edit was made on, as it was
        before the edit: same architecture, and every edited matrix of the same shape, dtype and SHA-256.
        """
        self._check_model_type(parts.model_type)
        for record in self.weights:
            if record.layer >= parts.num_layers:
                raise EditMismatchError(f"the model has no layer {record.layer}")
            weight = parts.rewrite_weight(record.layer)
            if list(weight.shape) != record.shape or str(weight.dtype) != record.dtype:
                raise EditMismatchError(
                    f"{record.path}: the edit expects {record.shape} {record.dtype}, the model has "
                    f"{list(weight.shape)} {weight.dtype}"
                )
            if tensor_sha256(weight) != record.original_sha256:
                raise EditMismatchError(f"{record.path}: the weights differ from those the edit was made on")

    def _check_model_type(self, model_type: str | None) -> None:
        if model_type != self.arch["model_type"]:
            raise EditMismatchError(
                f"the edit was made on a {self.arch['model_type']!r} model, not {model_type!r}"
            )

    # -- files -----------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {"deltas": self.deltas.float().contiguous()}
        for update in self.updates:
            tensors[f"update.{update.layer}.residuals"] = update.shares.contiguous()  # the file's name
            tensors[f"update.{update.layer}.solved_keys"] = update.solved_keys.contiguous()
            tensors[f"update.{update.layer}.fit_error"] = update.fit_error.contiguous()
            tensors[f"update.{update.layer}.leverage"] = update.leverage.contiguous()
        if self.misalignment is not None:
            for f in fields(self.misalignment):
                value = getattr(self.misalignment, f.name)
                if isinstance(value, np.ndarray):
                    tensors[f"misalignment.{f.name}"] = torch.from_numpy(np.ascontiguousarray(value))
        return tensors

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the edit as one safetensors file (atomically): the factors of every layer, the residuals,
        the misalignment arrays, and JSON metadata (facts, config, templates, stats, weight hashes, and a
        SHA-256 of every tensor, checked by :meth:`load`).
        """
        tensors = self._tensors()
        report = self.misalignment
        meta = {
            "format": FILE_FORMAT,
            "eamet_version": __version__,
            "arch": self.arch,
            "tokens": self.tokens,
            "model_fingerprint": self.model_fingerprint,
            "outcomes": [o.to_dict() for o in self.outcomes],
            "config": self.config.to_dict(),
            "facts": [f.to_dict() for f in self.facts],
            "templates": self.templates,
            "stats": [s.to_dict() for s in self.stats],
            "weights": [vars(r) for r in self.weights],
            "layers": [{"layer": u.layer, "path": u.path} for u in self.updates],
            "misalignment": None
            if report is None
            else {"top_m": report.top_m, "tau": report.tau, "progressive": report.progressive},
            "tensor_sha256": {name: tensor_sha256(t) for name, t in tensors.items()},
        }
        text = json.dumps(meta)
        atomic_save_tensors(path, tensors, {_META_KEY: text, _META_SHA_KEY: _text_sha256(text)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EditResult:
        """Reads a file written by :meth:`save` (not applied to any model yet: call :meth:`apply`).

        Raises ``CacheError`` naming the file for a corrupt, truncated or foreign file, and — for files
        with checksums (format 2) — naming the first tensor, or the metadata, whose bytes differ from
        what was saved. ``FileNotFoundError`` if there is no file.
        """
        meta, tensors = _read(path)
        try:
            updates = [
                LayerUpdate(
                    e["layer"],
                    e["path"],
                    tensors[f"update.{e['layer']}.residuals"],
                    tensors[f"update.{e['layer']}.solved_keys"],
                    tensors.get(f"update.{e['layer']}.fit_error", torch.zeros(0)),
                    leverage=tensors.get(f"update.{e['layer']}.leverage", torch.zeros(0)),
                )
                for e in meta["layers"]
            ]
            report = None
            if meta["misalignment"] is not None:
                arrays: dict[str, Any] = {
                    k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("misalignment.")
                }
                report = MisalignmentReport(**arrays, **meta["misalignment"])
            return cls(
                facts=[Fact.from_dict(f) for f in meta["facts"]],
                config=EditConfig.from_dict(meta["config"]),
                templates=list(meta["templates"]),
                updates=updates,
                deltas=tensors["deltas"],
                stats=[FactStats(**s) for s in meta["stats"]],
                misalignment=report,
                weights=[WeightRecord(**w) for w in meta["weights"]],
                arch=meta["arch"],
                tokens=meta.get("tokens", {}),
                model_fingerprint=meta.get("model_fingerprint", ""),
                outcomes=[FactOutcome(**o) for o in meta.get("outcomes", [])],
            )
        except (KeyError, TypeError, EametError) as exc:
            raise CacheError(f"{path}: incomplete or inconsistent edit file ({exc})", path=str(path)) from exc

    def summary(self) -> dict[str, Any]:
        """Scalars for printing or JSON: sizes, mean loss terms, steps, the seconds of the residuals computed
        (not ``reused`` from a store or a re-solved edit) and how many were reused, how many facts landed,
        each layer's median fit error and mean leverage (``eamet.edit.capacity``), and the misalignment total.
        """
        n = len(self.stats)
        mean = {k: sum(getattr(s, k) for s in self.stats) / n for k in ("loss", "nll", "steps", "delta_norm")}
        fit = {u.layer: float(u.fit_error.median()) for u in self.updates if u.fit_error.numel()}
        leverage = {u.layer: float(u.leverage.double().mean()) for u in self.updates if u.leverage.numel()}
        return {
            "facts": len(self.facts),
            "method": self.config.method,
            "layers": list(self.config.layers),
            "residual_seconds": sum(s.seconds for s in self.stats if not s.reused),
            "reused_residuals": sum(s.reused for s in self.stats),
            "landed": None if not self.outcomes else len(self.facts) - len(self.not_landed()),
            "mean": mean,
            "median_fit_error": fit,
            "mean_leverage": leverage,
            "misalignment_total": None if self.misalignment is None else self.misalignment.total,
        }


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of an edit file, verified against its checksums (format 2)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            header = handle.metadata() or {}
            text = header[_META_KEY]
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise TypeError("the metadata is not a JSON object")
    except (SafetensorError, KeyError, TypeError, json.JSONDecodeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CacheError(f"{path}: not a readable eamet edit file ({exc})", path=str(path)) from exc
    version = meta.get("format")
    if version not in _READABLE_FORMATS:
        raise CacheError(f"{path}: unsupported edit file format {version!r}", path=str(path))
    if version == 1:
        warnings.warn(
            f"{path} was written by an eamet without file checksums (format 1): its contents cannot be "
            "verified; save it again to add them",
            stacklevel=3,
        )
        return meta, tensors
    if header.get(_META_SHA_KEY) != _text_sha256(text):
        raise CacheError(
            f"{path}: the metadata does not match its SHA-256 (the file is damaged)", path=str(path)
        )
    expected: dict[str, str] = meta.get("tensor_sha256") or {}
    if set(expected) != set(tensors):
        odd = sorted(set(expected) ^ set(tensors))
        raise CacheError(
            f"{path}: tensors {odd} are missing or not listed (the file is damaged)", path=str(path)
        )
    for name, digest in expected.items():
        if tensor_sha256(tensors[name]) != digest:
            raise CacheError(
                f"{path}: tensor {name!r} does not match its SHA-256 (the file is damaged)", path=str(path)
            )
    return meta, tensors
