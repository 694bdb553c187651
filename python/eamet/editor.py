"""``Editor``: edits many facts of a causal LM at once, all-or-nothing, and returns an undoable result.

One edit (docs/editing.md, algorithm.md end to end):

1. check the facts; sample the context templates from the unedited model (seeded);
2. C = E[k kᵀ] for every edited layer (cached), on the unedited model;
3. keys at the last edited layer l*, from the unedited model: their norms and neighbourhoods;
4. a residual δ_i per fact, in batches (checkpointed to disk when asked);
5. per layer, keys and hidden states on the partially edited model, then Δ(λC + KKᵀ) = RKᵀ.

Weights change only in step 5, inside a :class:`~eamet.parts.WeightSnapshot`: any exception or interrupt
there, or while the result is assembled, puts every edited matrix back bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eamet import __version__
from eamet.arch import registered_layout
from eamet.checkpoint import ResidualCheckpoint
from eamet.config import EditConfig, Method
from eamet.covariance import Corpus, CovarianceCollector, model_fingerprint
from eamet.diagnostics import MisalignmentReport, misalignment
from eamet.errors import EametError, FactError, NonFiniteError, ParameterError
from eamet.facts import Fact, check_facts
from eamet.keys import PromptSet, collect
from eamet.loading import tokenizer_of
from eamet.parts import ModelParts, WeightSnapshot, eval_mode, tensor_sha256
from eamet.residuals import KeyNeighborhood, ResidualOptimizer, Residuals
from eamet.results import EditResult, WeightRecord
from eamet.solve import LayerUpdate, apply_update, solve_device, solve_layer
from eamet.templates import generate_templates
from eamet.tokens import TokenAdapter

__all__ = ["EditResult", "Editor"]


class Editor:
    """Edits facts into a Hugging Face causal LM with EAMET or MEMIT.

    Args:
        model: a ``transformers`` causal LM whose ``config.model_type`` is in the registry (or whose
            config's ``modules`` names its paths).
        tokenizer: its tokenizer (never modified); default: the one ``eamet.models.load`` returned with the
            model, else the tokenizer saved beside it (``config.name_or_path``); ``ParameterError`` if
            neither exists.
        config: the settings; default :meth:`EditConfig.for_model` for ``method``.
        method: ``"eamet"`` or ``"memit"``; default: ``config.method``, else ``"eamet"``. Must agree with a
            given config (build it with ``EditConfig.preset(name, method=...)``).
        corpus: text for C = E[k kᵀ]; default ``config.mom2_dataset``; see
            :func:`eamet.covariance.load_corpus`.
        device: where inputs and the float64 solve go; default: the model's device.
        cache_dir: statistics cache (default ``~/.cache/eamet/stats``).

    Example:
        >>> model, tokenizer = eamet.models.load("smollm2-135m")  # doctest: +SKIP
        >>> editor = Editor(model, method="memit", corpus="wiki.txt")  # doctest: +SKIP
        >>> result = editor.edit([Fact("The capital of {} is", "France", "Lyon")])  # doctest: +SKIP
        >>> result.undo()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
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
        self.tokens = TokenAdapter(tokenizer if tokenizer is not None else tokenizer_of(model), config.bos)
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
        ``checkpoint_dir``, each batch of residuals is saved as it is found, and a rerun with the same model,
        facts and settings resumes after the last saved batch with the same result.

        Raises:
            FactError: malformed, duplicated or conflicting facts (before any work), or a subject that
                cannot be located in its prompt.
            SolveError: the update's system is not positive definite.
        """
        fact_list = check_facts(facts)
        for i, fact in enumerate(fact_list):
            try:
                self.tokens.target_ids(fact.target)
            except FactError as exc:
                raise FactError(f"fact {i}: {exc}", row=i) from None
        with eval_mode(self.model, frozen=True):
            return self._edit(fact_list, checkpoint_dir, progress)

    def _edit(
        self, facts: list[Fact], checkpoint_dir: str | os.PathLike[str] | None, progress: bool
    ) -> EditResult:
        cfg = self.config
        # 1. facts and context templates (a resumed run keeps the templates it started with)
        templates = self._templates()
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = ResidualCheckpoint(Path(checkpoint_dir), self._fingerprint(facts), templates)
            templates = checkpoint.templates
        prompts = PromptSet.build(self.tokens, facts, templates, cfg.fact_token)
        # 2. covariance statistics of every edited layer
        moments = self.covariance(progress=progress)
        # 3. keys at l* on the unedited model
        keys = self._keys(prompts, cfg.layers[-1], progress)[0]
        # 4. residuals
        optimizer = ResidualOptimizer(
            self.model, self.parts, self.tokens, cfg, prompts, KeyNeighborhood.of(keys)
        )
        residuals = optimizer.run(checkpoint, progress=progress)
        if not bool(torch.isfinite(residuals.targets).all()):
            raise NonFiniteError("the optimised residuals hold NaN or Inf; nothing was changed")
        report = self._report(keys, residuals.deltas)
        # 5. the update, layer by layer; the weights change only here
        updates, records, snapshot = self._update(prompts, residuals, moments, progress)
        with snapshot:  # a failure while the result is assembled puts the weights back too
            result = EditResult(
                facts=facts,
                config=cfg,
                templates=templates,
                updates=updates,
                deltas=residuals.deltas.cpu(),
                stats=residuals.stats,
                misalignment=report,
                weights=records,
                arch=self.parts.describe(),
                tokens=self.tokens.describe(),
            )
        return result._applied_with(snapshot)

    def _templates(self) -> list[str]:
        cfg = self.config
        return generate_templates(
            self.model,
            self.tokens,
            cfg.template_seeds,
            length=cfg.template_length,
            temperature=cfg.template_temperature,
            top_k=cfg.template_top_k,
            top_p=cfg.template_top_p,
            seed=cfg.seed,
        )

    def _keys(
        self, prompts: PromptSet, layer: int, progress: bool, hidden_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, d_ff) keys at ``layer`` and, if asked, (N, d) hidden states at ``hidden_layer``."""
        keys, hidden = collect(
            self.model,
            self.parts,
            self.tokens,
            prompts,
            key_layer=layer,
            hidden_layer=hidden_layer,
            batch_size=self.config.key_batch_size,
            progress=progress,
        )
        assert keys is not None
        return keys, hidden

    def _update(
        self, prompts: PromptSet, residuals: Residuals, moments: dict[int, torch.Tensor], progress: bool
    ) -> tuple[list[LayerUpdate], list[WeightRecord], WeightSnapshot]:
        """Solves and applies every layer's update; returns them, the weights' records and the snapshot of
        the weights from before (restored if anything here fails)."""
        cfg, parts = self.config, self.parts
        l_star, m = cfg.layers[-1], len(cfg.layers)
        records = [WeightRecord.of(parts, layer) for layer in cfg.layers]
        updates: list[LayerUpdate] = []
        with WeightSnapshot(parts, cfg.layers) as snapshot:
            for j, layer in enumerate(cfg.layers):
                keys, hidden = self._keys(prompts, layer, progress, hidden_layer=l_star)
                assert hidden is not None
                # Each layer takes an equal share of the gap still left at l* (the last layer takes the rest).
                shares = (residuals.targets - hidden) / (m - j)
                solved = solve_layer(
                    moments[layer], keys, cfg.mom2_update_weight[j], solver=cfg.solver, layer=layer
                )
                update = LayerUpdate(
                    layer,
                    parts.spec.rewrite_path(layer),
                    shares.float().cpu(),
                    solved.float().cpu(),
                    keys=keys.float().cpu(),
                )
                update.measure_fit(keys)
                apply_update(parts.rewrite_weight(layer), update, parts.spec.weight_layout)
                updates.append(update)
            for record in records:
                record.edited_sha256 = tensor_sha256(parts.rewrite_weight(record.layer))
        return updates, records, snapshot

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
