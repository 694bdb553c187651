"""``Editor`` and ``EditResult``: change many facts of a causal LM at once, all-or-nothing, undoable.

One edit (algorithm.md, end to end):

1. check the facts; sample the context templates from the unedited model (seeded);
2. C = E[k kᵀ] for every edited layer (cached), on the unedited model;
3. keys and their neighbourhoods at the last edited layer l*, from the unedited model;
4. a residual δ_i per fact, in order (checkpointed to disk when asked);
5. per layer, keys and hidden states on the partially edited model, then Δ(λC + KKᵀ) = RKᵀ.

Weights change only in step 5; any exception or interrupt there puts every edited matrix back bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from eamet import __version__
from eamet.arch import ArchSpec, registered_layout
from eamet.config import EditConfig, Method
from eamet.covariance import Corpus, CovarianceCollector, model_fingerprint
from eamet.diagnostics import MisalignmentReport, misalignment, neighbors
from eamet.errors import (
    CacheError,
    EametError,
    EditMismatchError,
    FactError,
    NonFiniteError,
    ParameterError,
)
from eamet.facts import Fact, check_facts
from eamet.keys import PromptSet, collect
from eamet.parts import ModelParts, tensor_sha256
from eamet.residuals import FactStats, KeyNeighborhood, ResidualOptimizer
from eamet.solve import LayerUpdate, apply_update, solve_device, solve_layer
from eamet.templates import generate_templates
from eamet.tokens import TokenAdapter

__all__ = ["EditResult", "Editor"]

FILE_FORMAT = 1


@dataclass
class WeightRecord:
    """Identity of one edited matrix before and after the edit (checked by ``apply`` and ``undo``)."""

    layer: int
    path: str
    shape: list[int]
    dtype: str
    original_sha256: str
    edited_sha256: str = ""


@dataclass
class EditResult:
    """The outcome of :meth:`Editor.edit`: what was changed, how, and how to take it back.

    Attributes:
        facts: the edited facts, in editing order.
        config: the settings used; templates: the context templates (template 0 is the bare ``"{}"``).
        updates: one :class:`~eamet.solve.LayerUpdate` per edited layer (low-rank factors of Δ).
        deltas: (N, d) float32 residuals δ_i at the last edited layer.
        stats: per fact, the optimisation's loss terms, steps, ‖δ‖, radius and seconds.
        misalignment: report of the last layer's unedited keys vs ``deltas`` (``eamet.misalignment``,
            support j ≠ i); ``None`` for a single fact or when a residual is exactly zero.
        weights: per edited matrix, its path, shape, dtype and SHA-256 before/after.
        arch: the model type and module paths the edit was made on.
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
    _model: nn.Module | None = field(default=None, repr=False)
    _originals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def applied(self) -> bool:
        """Whether this result is currently applied to a model (and can be undone)."""
        return self._model is not None

    def undo(self) -> None:
        """Restores the edited matrices to their exact pre-edit values.

        Raises ``EditMismatchError`` if the result is not applied, or if the matrices changed since (undo
        later edits first: edits are undone in reverse order).
        """
        if self._model is None:
            raise EditMismatchError("this edit is not applied to a model")
        parts = ModelParts(self._model, ArchSpec(**self.arch["spec"]))
        for record in self.weights:
            if tensor_sha256(parts.rewrite_weight(record.layer)) != record.edited_sha256:
                raise EditMismatchError(
                    f"{record.path} changed since this edit was applied; undo later edits first"
                )
        try:
            _restore(parts, self._originals)
        except KeyboardInterrupt:
            _restore(parts, self._originals)  # finish: a half-undone edit could be neither undone nor kept
            raise
        finally:
            self._model = None
            self._originals = {}

    def apply(self, model: nn.Module) -> EditResult:
        """Applies this (e.g. loaded) edit to ``model`` in place and returns ``self``, now undoable.

        Refuses, with ``EditMismatchError`` and nothing changed, a model of another architecture, with
        other shapes or dtypes, or whose matrices are not the ones the edit was made on (SHA-256).
        """
        if self._model is not None:
            raise EditMismatchError("this edit is already applied; undo it first")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type != self.arch["model_type"]:
            raise EditMismatchError(
                f"the edit was made on a {self.arch['model_type']!r} model, not {model_type!r}"
            )
        parts = ModelParts(model, ArchSpec(**self.arch["spec"]))
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
        originals = {r.layer: parts.rewrite_weight(r.layer).detach().clone() for r in self.weights}
        try:
            for update in self.updates:
                apply_update(parts.rewrite_weight(update.layer), update, parts.spec.weight_layout)
        except BaseException:
            _restore(parts, originals)
            raise
        for record in self.weights:
            if tensor_sha256(parts.rewrite_weight(record.layer)) != record.edited_sha256:
                warnings.warn(
                    f"{record.path}: re-applied weights differ in rounding from the original edit's "
                    "(another device's float64 arithmetic)",
                    stacklevel=2,
                )
                break
        self._model, self._originals = model, originals
        return self

    # -- files -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the edit as one safetensors file (atomically): the factors of every layer, the residuals,
        the misalignment arrays, and JSON metadata (facts, config, templates, stats, weight hashes).
        """
        tensors: dict[str, torch.Tensor] = {"deltas": self.deltas.float().contiguous()}
        for update in self.updates:
            tensors[f"update.{update.layer}.residuals"] = update.residuals.contiguous()
            tensors[f"update.{update.layer}.solved_keys"] = update.solved_keys.contiguous()
            tensors[f"update.{update.layer}.fit_error"] = update.fit_error.contiguous()
        report_meta = None
        if self.misalignment is not None:
            for f in fields(self.misalignment):
                value = getattr(self.misalignment, f.name)
                if isinstance(value, np.ndarray):
                    tensors[f"misalignment.{f.name}"] = torch.from_numpy(np.ascontiguousarray(value))
            rep = self.misalignment
            report_meta = {"top_m": rep.top_m, "tau": rep.tau, "progressive": rep.progressive}
        meta = {
            "format": FILE_FORMAT,
            "eamet_version": __version__,
            "arch": self.arch,
            "tokens": self.tokens,
            "config": self.config.to_dict(),
            "facts": [f.to_dict() for f in self.facts],
            "templates": self.templates,
            "stats": [s.to_dict() for s in self.stats],
            "weights": [vars(r) for r in self.weights],
            "layers": [{"layer": u.layer, "path": u.path} for u in self.updates],
            "misalignment": report_meta,
        }
        _atomic_save(tensors, {"eamet": json.dumps(meta)}, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EditResult:
        """Reads a file written by :meth:`save` (not applied to any model yet: call :meth:`apply`).
        Raises ``CacheError`` for a corrupt or foreign file.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["eamet"])
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise CacheError(f"{path}: not a readable eamet edit file ({exc})", path=str(path)) from exc
        if meta.get("format") != FILE_FORMAT:
            raise CacheError(f"{path}: unsupported edit file format {meta.get('format')!r}", path=str(path))
        try:
            updates = [
                LayerUpdate(
                    e["layer"],
                    e["path"],
                    tensors[f"update.{e['layer']}.residuals"],
                    tensors[f"update.{e['layer']}.solved_keys"],
                    tensors.get(f"update.{e['layer']}.fit_error", torch.zeros(0)),
                )
                for e in meta["layers"]
            ]
            report = None
            if meta["misalignment"] is not None:
                arrays = {
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
            )
        except (KeyError, TypeError, EametError) as exc:
            raise CacheError(f"{path}: incomplete or inconsistent edit file ({exc})", path=str(path)) from exc

    def summary(self) -> dict[str, Any]:
        """Scalars for printing or JSON: sizes, mean loss terms, steps, seconds, each layer's median fit
        error and the misalignment total.
        """
        n = len(self.stats)
        mean = {k: sum(getattr(s, k) for s in self.stats) / n for k in ("loss", "nll", "steps", "delta_norm")}
        fit = {u.layer: float(u.fit_error.median()) for u in self.updates if u.fit_error.numel()}
        return {
            "facts": len(self.facts),
            "method": self.config.method,
            "layers": list(self.config.layers),
            "residual_seconds": sum(s.seconds for s in self.stats),
            "mean": mean,
            "median_fit_error": fit,
            "misalignment_total": None if self.misalignment is None else self.misalignment.total,
        }


def _restore(parts: ModelParts, originals: Mapping[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, weight in originals.items():
            parts.rewrite_weight(layer).copy_(weight)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(tmp), metadata=metadata
        )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class _Checkpoint:
    """Per-fact residuals of an edit in progress, so a killed run resumes where it stopped."""

    def __init__(self, root: Path, fingerprint: str, templates: list[str]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        manifest = root / "run.json"
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
            tmp = root / ".run.json.tmp"
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "templates": templates}), encoding="utf-8")
            tmp.replace(manifest)

    def path(self, i: int) -> Path:
        return self.root / f"fact-{i:07d}.safetensors"

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, FactStats] | None:
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
        _atomic_save({"delta": delta, "h": h}, {"stats": json.dumps(stats.to_dict())}, self.path(i))


class Editor:
    """Edits facts into a Hugging Face causal LM with EAMET or MEMIT.

    Args:
        model: a ``transformers`` causal LM whose ``config.model_type`` is in the registry (or whose
            config's ``modules`` names its paths).
        tokenizer: its tokenizer (never modified).
        config: the settings; default :meth:`EditConfig.for_model` for ``method``.
        method: ``"eamet"`` or ``"memit"``; default: ``config.method``, else ``"eamet"``. Must agree with a
            given config (build it with ``EditConfig.preset(name, method=...)``).
        corpus: text for C = E[k kᵀ]; default ``config.mom2_dataset``; see
            :func:`eamet.covariance.load_corpus`.
        device: where inputs and the float64 solve go; default: the model's device.
        cache_dir: statistics cache (default ``~/.cache/eamet/stats``).

    Example:
        >>> editor = Editor(model, tokenizer, method="memit", corpus="wiki.txt")  # doctest: +SKIP
        >>> result = editor.edit([Fact("The capital of {} is", "France", "Lyon")])  # doctest: +SKIP
        >>> result.undo()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: EditConfig | None = None,
        method: Method | None = None,
        corpus: Corpus | None = None,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if config is None:
            config = EditConfig.for_model(model, method or "eamet")
        elif method is not None and method != config.method:
            raise ParameterError(
                f"method={method!r} but the config is for {config.method!r}; use "
                f"EditConfig.preset(name, method={method!r}) or EditConfig.for_method({method!r})",
                argument="method",
            )
        self.model, self.config = model, config
        spec = None if config.modules is None else registered_layout(config.modules, model)
        self.parts = ModelParts(model, spec)
        if config.layers[-1] >= self.parts.num_layers:
            raise ParameterError(
                f"layers {list(config.layers)}: the model has only {self.parts.num_layers} blocks",
                argument="layers",
            )
        self.tokens = TokenAdapter(tokenizer, config.bos)
        devices = sorted({str(p.device) for p in model.parameters()})
        if len(devices) > 1:
            raise ParameterError(
                f"the model's parameters are spread over {', '.join(devices)}; eamet edits a model that "
                "lives on one device (load it without device_map, or move it with .to(device))",
                argument="model",
            )
        self.device = self.parts.device
        if device is not None and not _same_device(torch.device(device), self.device):
            raise ParameterError(
                f"device {device} differs from the model's device {self.device}", argument="device"
            )
        self.corpus: Corpus = corpus if corpus is not None else config.mom2_dataset
        self.cache_dir = cache_dir
        # layer -> (fingerprint of the weights it was collected on, C): a reused Editor notices edits.
        self._moments: dict[int, tuple[str, torch.Tensor]] = {}

    def covariance(
        self, layers: Sequence[int] | None = None, *, progress: bool = True
    ) -> dict[int, torch.Tensor]:
        """C = E[k kᵀ] (d_ff × d_ff float64 on the device; on the CPU for MPS, which has no float64) of
        the edited layers, collected or loaded from the cache, and kept in memory for as long as the
        weights it depends on stay the same.
        """
        layers = list(layers or self.config.layers)
        prints = {layer: model_fingerprint(self.model, self.parts, layer) for layer in layers}
        wanted = [layer for layer in layers if self._moments.get(layer, ("",))[0] != prints[layer]]
        if wanted:
            collector = CovarianceCollector(
                self.model,
                self.parts,
                self.tokens,
                corpus=self.corpus,
                n_samples=self.config.mom2_n_samples,
                max_length=self.config.mom2_max_length,
                dtype=self.config.mom2_dtype,
                cache_dir=self.cache_dir,
                progress=progress,
            )
            for layer, acc in collector.moments(wanted).items():
                moment = torch.from_numpy(acc.moment()).to(solve_device(self.device))
                self._moments[layer] = (prints[layer], moment)
        return {layer: self._moments[layer][1] for layer in layers}

    def edit(
        self,
        facts: Iterable[Fact | Mapping[str, Any]],
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> EditResult:
        """Edits ``facts`` into the model in place and returns the :class:`EditResult`.

        All-or-nothing: on any exception or ``KeyboardInterrupt`` the weights are exactly as before. With
        ``checkpoint_dir``, each fact's residual is saved as it is found, and a rerun with the same model,
        facts and settings resumes after the last saved fact with the same result.

        Raises:
            FactError: malformed, duplicated or conflicting facts (before any work), or a subject that
                cannot be located in its prompt.
            SolveError: the update's system is not positive definite.
        """
        model = self.model
        fact_list = check_facts(facts)
        for i, fact in enumerate(fact_list):
            try:
                self.tokens.target_ids(fact.target)
            except FactError as exc:
                raise FactError(f"fact {i}: {exc}", row=i) from None
        was_training = model.training
        grad_flags = [p.requires_grad for p in model.parameters()]
        model.eval()
        model.requires_grad_(False)
        try:
            return self._edit(fact_list, checkpoint_dir, progress)
        finally:
            for p, flag in zip(model.parameters(), grad_flags, strict=True):
                p.requires_grad_(flag)
            model.train(was_training)

    def _edit(
        self, facts: list[Fact], checkpoint_dir: str | os.PathLike[str] | None, progress: bool
    ) -> EditResult:
        cfg, model, parts, tokens = self.config, self.model, self.parts, self.tokens
        l_star = cfg.layers[-1]
        templates = generate_templates(
            model,
            tokens,
            cfg.template_seeds,
            length=cfg.template_length,
            temperature=cfg.template_temperature,
            top_k=cfg.template_top_k,
            top_p=cfg.template_top_p,
            seed=cfg.seed,
        )
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = _Checkpoint(Path(checkpoint_dir), self._fingerprint(facts), templates)
            templates = checkpoint.templates
        prompts = PromptSet.build(tokens, facts, templates, cfg.fact_token)
        moments = self.covariance(progress=progress)

        keys_star, _ = collect(
            model,
            parts,
            tokens,
            prompts,
            key_layer=l_star,
            hidden_layer=None,
            batch_size=cfg.key_batch_size,
            progress=progress,
        )
        assert keys_star is not None
        nbhd = self._neighborhood(keys_star)
        optimizer = ResidualOptimizer(model, parts, tokens, cfg, prompts, nbhd)
        n, d = len(facts), parts.hidden_dim(l_star)
        deltas = torch.zeros((n, d), device=self.device)
        hidden = torch.zeros((n, d), device=self.device)
        stats: list[FactStats] = []
        bar = tqdm(range(n), desc=f"{cfg.method} residuals", unit="fact", disable=not progress)
        for i in bar:
            found = checkpoint.load(i) if checkpoint is not None else None
            if found is None:
                with torch.enable_grad():
                    delta, h, fact_stats = optimizer.optimize(i, deltas[:i])
                if checkpoint is not None:
                    checkpoint.save(i, delta, h, fact_stats)
            else:
                delta, h, fact_stats = found
            deltas[i], hidden[i] = delta.to(self.device), h.to(self.device)
            stats.append(fact_stats)
            bar.set_postfix(loss=f"{fact_stats.loss:.3f}", nll=f"{fact_stats.nll:.3f}", refresh=False)
        targets = hidden + deltas
        if not bool(torch.isfinite(targets).all()):
            raise NonFiniteError("the optimised residuals hold NaN or Inf; nothing was changed")
        # Everything that can fail runs before the weights change or inside _update's rollback.
        report = self._report(keys_star, deltas)
        updates, records = self._update(prompts, targets, moments, progress)
        try:
            result = EditResult(
                facts=facts,
                config=cfg,
                templates=templates,
                updates=updates,
                deltas=deltas.cpu(),
                stats=stats,
                misalignment=report,
                weights=records,
                arch=parts.describe(),
                tokens=tokens.describe(),
            )
            result._model = model
            result._originals = self._last_originals
        except BaseException:
            _restore(parts, self._last_originals)
            raise
        return result

    def _neighborhood(self, keys: torch.Tensor) -> KeyNeighborhood:
        norms = keys.norm(dim=1)
        unit = keys / norms.clamp_min(1e-12)[:, None]
        n = keys.shape[0]
        align = self.config.cs_factor > 0 or self.config.mse_factor > 0
        if align and n >= 2:
            # Top-M among earlier facts, from the Rust core: neighbour lists instead of an N × N matrix.
            idx, _ = neighbors(keys.detach().float().cpu().numpy(), self.config.top_m, progressive=True)
            top = torch.from_numpy(idx).to(keys.device)
        else:
            top = torch.full((n, 0), -1, dtype=torch.long, device=keys.device)
        return KeyNeighborhood(unit_keys=unit, norms=norms, top=top)

    def _update(
        self, prompts: PromptSet, targets: torch.Tensor, moments: dict[int, torch.Tensor], progress: bool
    ) -> tuple[list[LayerUpdate], list[WeightRecord]]:
        cfg, parts = self.config, self.parts
        l_star, m = cfg.layers[-1], len(cfg.layers)
        records = []
        for layer in cfg.layers:
            weight = parts.rewrite_weight(layer)
            records.append(
                WeightRecord(
                    layer,
                    parts.spec.rewrite_path(layer),
                    list(weight.shape),
                    str(weight.dtype),
                    tensor_sha256(weight),
                )
            )
        originals = {r.layer: parts.rewrite_weight(r.layer).detach().clone() for r in records}
        updates: list[LayerUpdate] = []
        try:
            for j, layer in enumerate(cfg.layers):
                keys, hidden = collect(
                    self.model,
                    parts,
                    self.tokens,
                    prompts,
                    key_layer=layer,
                    hidden_layer=l_star,
                    batch_size=cfg.key_batch_size,
                    progress=progress,
                )
                assert keys is not None and hidden is not None
                # Each layer takes an equal share of the gap still left at l* (the last layer takes the rest).
                residuals = (targets - hidden) / (m - j)
                solved = solve_layer(
                    moments[layer], keys, cfg.mom2_update_weight[j], solver=cfg.solver, layer=layer
                )
                update = LayerUpdate(
                    layer,
                    parts.spec.rewrite_path(layer),
                    residuals.float().cpu(),
                    solved.float().cpu(),
                    keys=keys.float().cpu(),
                )
                update.measure_fit(keys)
                apply_update(parts.rewrite_weight(layer), update, parts.spec.weight_layout)
                updates.append(update)
            for record in records:
                record.edited_sha256 = tensor_sha256(parts.rewrite_weight(record.layer))
        except BaseException:
            _restore(parts, originals)
            raise
        self._last_originals = originals
        return updates, records

    def _report(self, keys: torch.Tensor, deltas: torch.Tensor) -> MisalignmentReport | None:
        if keys.shape[0] < 2:
            return None
        if bool((deltas.norm(dim=1) == 0).any()):
            warnings.warn(
                "a residual is exactly zero (its fact needed no change): no misalignment report", stacklevel=3
            )
            return None
        try:
            return misalignment(
                keys.float().cpu().numpy(),
                deltas.float().cpu().numpy(),
                tau=self.config.tau,
                top_m=self.config.top_m,
                progress=False,
            )
        except EametError as exc:  # a diagnostic never fails an edit (e.g. a zero key row)
            warnings.warn(f"no misalignment report: {exc}", stacklevel=3)
            return None

    def _fingerprint(self, facts: list[Fact]) -> str:
        digest = hashlib.sha256()
        # Residuals depend on every weight (the NLL runs to the unembedding), the tokenizer, the settings
        # and the algorithm's version.
        digest.update(__version__.encode())
        digest.update(model_fingerprint(self.model, self.parts).encode())
        digest.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        digest.update(json.dumps([f.to_dict() for f in facts], sort_keys=True).encode())
        digest.update(self.tokens.fingerprint().encode())
        return digest.hexdigest()


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    """``cuda`` names the current CUDA device, so it equals ``cuda:0`` when that is current."""
    if asked.type != actual.type:
        return False
    if asked.index is None or actual.index is None:
        current = torch.cuda.current_device() if asked.type == "cuda" else 0
        return (asked.index if asked.index is not None else current) == (
            actual.index if actual.index is not None else current
        )
    return asked.index == actual.index
