"""``Editor``: edits many facts of a causal LM at once, all-or-nothing, and returns an undoable result.

One edit (docs/editing.md, algorithm.md end to end):

1. check the facts; sample the context templates from the unedited model (seeded);
2. C = E[k kᵀ] for every edited layer (cached), on the unedited model;
3. keys at the last edited layer l*, from the unedited model: their norms and neighbourhoods;
4. a residual δ_i per fact, in batches (checkpointed to disk when asked);
5. per layer, keys and hidden states on the partially edited model, then Δ(λC + KKᵀ) = RKᵀ.

Weights change only in step 5, inside a :class:`~eamet.model.parts.WeightSnapshot`: any exception or interrupt
there, or while the result is assembled, puts every edited matrix back bit for bit.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from eamet.base.arch import registered_layout
from eamet.base.errors import (
    EametError,
    EditMismatchError,
    FactError,
    NonFiniteError,
    NotLandedWarning,
    ParameterError,
)
from eamet.base.facts import Fact, check_facts, fill
from eamet.base.settings import SOLVE_SETTINGS, EditConfig, Method
from eamet.edit.capacity import CapacityReport, capacity_of
from eamet.edit.corpus import Corpus
from eamet.edit.keys import PromptSet, collect_layers
from eamet.edit.moment_collector import SecondMomentCollector
from eamet.edit.optimizer import ResidualOptimizer
from eamet.edit.residual_records import FactStats, KeyNeighborhood
from eamet.edit.results import EditResult, FactOutcome, WeightRecord
from eamet.edit.solve import LayerUpdate, apply_update, solve_layer
from eamet.edit.store import KeyChain, ResidualStore, template_key
from eamet.kernels.diagnostics import MisalignmentReport, misalignment
from eamet.model.device import solve_device
from eamet.model.fingerprint import model_fingerprint
from eamet.model.parts import ModelParts, WeightSnapshot, eval_mode, tensor_sha256
from eamet.model.scoring import score_targets
from eamet.model.templates import generate_templates
from eamet.model.tokens import TokenAdapter, tokenizer_of

__all__ = ["EditResult", "Editor"]


class Editor:
    """Edits facts into a Hugging Face causal LM with EAMET or MEMIT.

    Args:
        model: a ``transformers`` causal LM whose ``config.model_type`` is in the registry (or whose
            config's ``modules`` names its paths).
        tokenizer: its tokenizer (never modified); default: the one ``eamet.models.load`` returned with the
            model, else the tokenizer saved beside it (``config.name_or_path``); ``ParameterError`` if
            neither exists.
        config: the settings; default: the preset of a model eamet knows (``eamet.models.load``'s, corpus
            for C included), else :meth:`EditConfig.for_model` for ``method`` (``eamet.models.config_for``).
        method: ``"eamet"`` or ``"memit"``; default: ``config.method``, else ``"eamet"``. Must agree with a
            given config (build it with ``EditConfig.preset(name, method=...)``).
        corpus: text for C = E[k kᵀ]; default ``config.mom2_dataset``; see
            :func:`eamet.edit.corpus.load_corpus`.
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
            from eamet.models import config_for  # a known model's preset, corpus included

            config = config_for(model, method or "eamet")
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
        self._corpus_given = corpus is not None
        self.cache_dir = cache_dir
        # (layer, C's settings) -> (fingerprint of the weights it was collected on, C): a reused Editor
        # notices edits, and a re-solve with other statistics settings gets its own C.
        self._moments: dict[tuple[int, tuple[Any, ...]], tuple[str, torch.Tensor]] = {}
        self._sampled_templates: dict[str, list[str]] = {}  # template key -> seeded templates

    def covariance(
        self, layers: Sequence[int] | None = None, *, progress: bool = True
    ) -> dict[int, torch.Tensor]:
        """C = E[k kᵀ] (d_ff × d_ff float64 on the device; on the CPU for MPS, which has no float64) of
        the edited layers, collected or loaded from the cache, and kept in memory for as long as the
        weights it depends on stay the same.
        """
        return self._covariance(list(layers or self.config.layers), self.config, self.corpus, progress)

    def capacity(self, facts: Iterable[Fact | Mapping[str, Any]], *, progress: bool = True) -> CapacityReport:
        """How much of each fact's residual the update of every edited block can realise, before any
        residual is optimised (``eamet.edit.capacity``): per block, each fact's leverage
        h_i = k_iᵀ(λC + KᵀK)⁻¹k_i, tr(H) against N, and the top-M key cosines.

        Costs what an edit costs before its residual step: the context templates, C (cached), and one
        template-averaged forward per fact (every block's keys at once), on the unedited model; no weight
        changes.
        During an edit, the keys of every block after the first are recomputed on the model as edited
        up to the blocks before it, so the leverage the edit really has (``CapacityReport.of_result``,
        ``LayerUpdate.leverage``) can differ slightly from this forecast for those blocks.

        Raises:
            FactError: malformed, duplicated or conflicting facts, a target with no tokens, or a subject
                that cannot be located in its prompt (as :meth:`edit`).
            SolveError: λC + KᵀK is not positive definite at a block's λ (the edit would fail too).
        """
        cfg = self.config
        fact_list = self._checked(facts)
        with eval_mode(self.model, frozen=True):
            prompts = PromptSet.build(self.tokens, fact_list, self._templates(), cfg.fact_token)
            moments = self.covariance(progress=progress)
            keys = self._keys(prompts, cfg.layers, progress)[0]
        lambdas = dict(zip(cfg.layers, cfg.mom2_update_weight, strict=True))
        return capacity_of(keys, moments, lambdas, top_m=cfg.top_m, method=cfg.method)

    def _covariance(
        self, layers: list[int], config: EditConfig, corpus: Corpus, progress: bool
    ) -> dict[int, torch.Tensor]:
        """C of ``layers`` with ``config``'s statistics settings over ``corpus`` (memoised)."""
        source = corpus if isinstance(corpus, str | os.PathLike) else id(corpus)
        settings = (str(source), config.mom2_n_samples, config.mom2_max_length, config.mom2_dtype)
        prints = {layer: model_fingerprint(self.model, self.parts, layer) for layer in layers}
        wanted = [
            layer for layer in layers if self._moments.get((layer, settings), ("",))[0] != prints[layer]
        ]
        if wanted:
            collector = SecondMomentCollector(
                self.model,
                self.parts,
                self.tokens,
                corpus=corpus,
                n_samples=config.mom2_n_samples,
                max_length=config.mom2_max_length,
                dtype=config.mom2_dtype,
                cache_dir=self.cache_dir,
                progress=progress,
            )
            for layer, acc in collector.moments(wanted).items():
                moment = torch.from_numpy(acc.moment()).to(solve_device(self.device))
                self._moments[(layer, settings)] = (prints[layer], moment)
        return {layer: self._moments[(layer, settings)][1] for layer in layers}

    def edit(
        self,
        facts: Iterable[Fact | Mapping[str, Any]],
        *,
        residual_store: str | os.PathLike[str] | ResidualStore | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> EditResult:
        """Edits ``facts`` into the model in place and returns the :class:`EditResult`.

        All-or-nothing: on any exception or ``KeyboardInterrupt`` the weights are exactly as before.

        With ``residual_store`` (a directory or a :class:`~eamet.edit.store.ResidualStore`), every residual
        the store holds for exactly these inputs is taken from it and every one computed is saved to it as
        its batch finishes: a killed edit rerun resumes after its last saved batch, and a later edit with
        another λ, solver, corpus or earlier blocks, or of a prefix of these facts, reuses the residuals
        (docs/editing.md, "The residual store"). ``checkpoint_dir`` is its older name (deprecated).

        Raises:
            FactError: malformed, duplicated or conflicting facts (before any work), or a subject that
                cannot be located in its prompt.
            CacheError: the store is not a residual store, or cannot be written.
            SolveError: the update's system is not positive definite.
        """
        if checkpoint_dir is not None:
            if residual_store is not None:
                raise ParameterError(
                    "give residual_store or checkpoint_dir (its older name), not both",
                    argument="checkpoint_dir",
                )
            warnings.warn(
                "checkpoint_dir is now residual_store (the same directory serves every later edit too)",
                DeprecationWarning,
                stacklevel=2,
            )
            residual_store = checkpoint_dir
        fact_list = self._checked(facts)
        store = residual_store
        if store is not None and not isinstance(store, ResidualStore):
            store = ResidualStore(store)  # before any work: a directory that cannot be a store fails here
        with eval_mode(self.model, frozen=True):
            result = self._edit(fact_list, store, progress)
        _warn_not_landed(result)
        return result

    def _checked(self, facts: Iterable[Fact | Mapping[str, Any]]) -> list[Fact]:
        """``facts`` as :class:`Fact` s, checked (``FactError`` naming the first bad one), with targets
        that tokenise."""
        fact_list = check_facts(facts)
        for i, fact in enumerate(fact_list):
            try:
                self.tokens.target_ids(fact.target)
            except FactError as exc:
                raise FactError(f"fact {i}: {exc}", row=i) from None
        return fact_list

    def _edit(self, facts: list[Fact], store: ResidualStore | None, progress: bool) -> EditResult:
        cfg = self.config
        model_print = model_fingerprint(self.model, self.parts)
        # 1. facts and context templates (a store keeps the templates its first edit sampled)
        key = self._template_key(model_print)
        templates = (
            self._templates(key) if store is None else store.templates(key, lambda: self._templates(key))
        )
        prompts = PromptSet.build(self.tokens, facts, templates, cfg.fact_token)
        # 2. covariance statistics of every edited layer
        moments = self.covariance(progress=progress)
        # 3. keys of the first edited block and of l*, and hidden states at l*, on the unedited model in
        #    one forward: l*'s neighbourhoods read them, and the first block's update (the blocks between
        #    are collected when their turn comes: their keys move with the updates before them)
        ends = sorted({cfg.layers[0], cfg.layers[-1]})
        unedited, hidden = self._keys(prompts, ends, progress, hidden_layer=cfg.layers[-1])
        assert hidden is not None
        keys = unedited[cfg.layers[-1]]
        # 4. residuals
        optimizer = ResidualOptimizer(
            self.model, self.parts, self.tokens, cfg, prompts, KeyNeighborhood.of(keys)
        )
        chain = None
        if store is not None:
            base = self._residual_base(model_print, templates, optimizer.compute_dtype)
            chain = KeyChain(base, facts, aligned=optimizer.align, batch_alignment=cfg.batch_alignment)
        residuals = optimizer.run(store, chain, progress=progress)
        if not bool(torch.isfinite(residuals.targets).all()):
            raise NonFiniteError("the optimised residuals hold NaN or Inf; nothing was changed")
        report = self._report(keys, residuals.deltas)
        # 5. the update, layer by layer; the weights change only here
        return self._apply(
            facts,
            cfg,
            templates,
            prompts,
            residuals.deltas,
            residuals.targets,
            residuals.stats,
            report,
            moments,
            model_print,
            progress,
            first=(unedited[cfg.layers[0]], hidden),
        )

    def _apply(
        self,
        facts: list[Fact],
        cfg: EditConfig,
        templates: list[str],
        prompts: PromptSet,
        deltas: torch.Tensor,
        targets: torch.Tensor,
        stats: list[FactStats],
        report: MisalignmentReport | None,
        moments: dict[int, torch.Tensor],
        model_print: str,
        progress: bool,
        first: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> EditResult:
        """Solves and applies every layer's update for (N, d) ``targets`` z at l* and returns the applied
        result (the weights are restored if anything here fails). ``first``: the first block's keys and
        the hidden states at l* on the unedited weights, if already collected."""
        updates, records, snapshot = self._update(cfg, prompts, targets, moments, progress, first)
        with snapshot:  # a failure while the result is assembled puts the weights back too
            scores = score_targets(
                self.model, self.tokens, [fill(f.prompt, f.subject) for f in facts], [f.target for f in facts]
            )
            outcomes = [
                FactOutcome(landed=bool(landed), nll=float(nll), residual_nll=s.nll)
                for landed, nll, s in zip(scores.strict, scores.nll, stats, strict=True)
            ]
            result = EditResult(
                facts=facts,
                config=cfg,
                templates=templates,
                updates=updates,
                deltas=deltas.cpu(),
                stats=stats,
                misalignment=report,
                weights=records,
                arch=self.parts.describe(),
                tokens=self.tokens.describe(),
                model_fingerprint=model_print,
                outcomes=outcomes,
            )
        return result._applied_with(snapshot)

    def resolve(
        self,
        result: EditResult,
        *,
        corpus: Corpus | None = None,
        progress: bool = True,
        **changes: Any,
    ) -> EditResult:
        """The edit ``result`` made again with other settings of the solve, reusing its residuals: seconds
        where the edit took minutes or hours. Edits the model in place and returns the new result.

        ``changes`` are :class:`EditConfig` fields of the solve (:data:`SOLVE_SETTINGS`): λ per block
        (``mom2_update_weight``), ``solver``, the statistics of C (``mom2_n_samples``, ``mom2_max_length``,
        ``mom2_dtype``, ``mom2_dataset``), ``layers`` as long as the last block (where the residuals live)
        stays the same, and ``key_batch_size``. C comes from ``corpus``, else the editor's own corpus if
        it was given one, else the new settings' ``mom2_dataset``.

        The model must be the unedited model ``result`` was made on (undo a live result first). The new
        result equals a fresh :meth:`edit` of the same facts with the new settings up to float32 noise:
        the keys and hidden states are recomputed on this model, the residuals are ``result``'s.

        Raises:
            ParameterError: a change that is not a setting of the solve, or another last block.
            EditMismatchError: another model, or weights that are not those the edit was made on.
            SolveError: the new system is not positive definite. The weights are then as before.
        """
        unknown = sorted(set(changes) - set(SOLVE_SETTINGS))
        if unknown:
            raise ParameterError(
                f"re-solving changes only the solve ({', '.join(SOLVE_SETTINGS)}); {', '.join(unknown)} "
                "would change the residuals: edit again (with a residual_store to reuse what still holds)",
                argument=unknown[0],
            )
        old = result.config
        if "layers" in changes and "mom2_update_weight" not in changes:
            cfg = old.on_layers(changes.pop("layers"), **changes)
        else:
            cfg = old.replace(**changes)
        if cfg.layers[-1] != old.layers[-1]:
            raise ParameterError(
                f"layers {list(cfg.layers)} end at block {cfg.layers[-1]}, but the residuals live at block "
                f"{old.layers[-1]}: a re-solve keeps the last edited block",
                argument="layers",
            )
        self._check_unedited(result)
        chosen = corpus if corpus is not None else self.corpus if self._corpus_given else cfg.mom2_dataset
        with eval_mode(self.model, frozen=True):
            prompts = PromptSet.build(self.tokens, result.facts, result.templates, cfg.fact_token)
            moments = self._covariance(list(cfg.layers), cfg, chosen, progress)
            first_keys, hidden = self._keys(
                prompts, cfg.layers[:1], progress, hidden_layer=cfg.layers[-1], config=cfg
            )
            assert hidden is not None
            deltas = result.deltas.to(hidden.device, torch.float32)
            resolved = self._apply(
                list(result.facts),
                cfg,
                list(result.templates),
                prompts,
                result.deltas,
                hidden + deltas,
                [replace(s, reused=True) for s in result.stats],
                result.misalignment,
                moments,
                result.model_fingerprint or model_fingerprint(self.model, self.parts),
                progress,
                first=(first_keys[cfg.layers[0]], hidden),
            )
        _warn_not_landed(resolved)
        return resolved

    def _check_unedited(self, result: EditResult) -> None:
        """``EditMismatchError`` unless this editor's model is the unedited model ``result`` was made on:
        its edited matrices (``EditResult.check_original``) and, where recorded, every weight."""
        if result.applied:
            raise EditMismatchError(
                "this edit is applied to a model: undo it first (re-solving needs the unedited weights)"
            )
        result.check_original(self.parts)
        if result.model_fingerprint and result.model_fingerprint != model_fingerprint(self.model, self.parts):
            raise EditMismatchError("the model's weights differ from those the edit was made on")

    def _templates(self, key: str | None = None) -> list[str]:
        """The context templates, sampled once per model and sampler settings (``key``, default: the
        model as it is now) by this editor: a grid of edits with one editor samples them once (seeded,
        they are the same every time)."""
        if key is None:
            key = self._template_key(model_fingerprint(self.model, self.parts))
        if key in self._sampled_templates:
            return list(self._sampled_templates[key])
        cfg = self.config
        templates = generate_templates(
            self.model,
            self.tokens,
            cfg.template_seeds,
            length=cfg.template_length,
            temperature=cfg.template_temperature,
            top_k=cfg.template_top_k,
            top_p=cfg.template_top_p,
            seed=cfg.seed,
        )
        if cfg.seed is not None:  # unseeded sampling is new every edit, as the reference's
            self._sampled_templates[key] = templates
        return list(templates)

    def _keys(
        self,
        prompts: PromptSet,
        layers: Sequence[int],
        progress: bool,
        hidden_layer: int | None = None,
        config: EditConfig | None = None,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """(N, d_ff) keys at each of ``layers`` (one forward) and, if asked, (N, d) hidden states at
        ``hidden_layer``."""
        return collect_layers(
            self.model,
            self.parts,
            self.tokens,
            prompts,
            key_layers=layers,
            hidden_layer=hidden_layer,
            batch_size=(config or self.config).key_batch_size,
            progress=progress,
        )

    def _update(
        self,
        cfg: EditConfig,
        prompts: PromptSet,
        targets: torch.Tensor,
        moments: dict[int, torch.Tensor],
        progress: bool,
        first: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[list[LayerUpdate], list[WeightRecord], WeightSnapshot]:
        """Solves and applies every layer's update towards the (N, d) ``targets`` z at l*; returns the
        updates, the weights' records and the snapshot of the weights from before (restored if anything
        here fails). Each block's keys, and the hidden states at l*, are collected on the weights as
        updated so far; for the first block that is the unedited model, so ``first`` (its keys and the
        hidden states, collected before) stands in for that forward."""
        parts = self.parts
        l_star, m = cfg.layers[-1], len(cfg.layers)
        records = [WeightRecord.of(parts, layer) for layer in cfg.layers]
        updates: list[LayerUpdate] = []
        with WeightSnapshot(parts, cfg.layers) as snapshot:
            for j, layer in enumerate(cfg.layers):
                if j == 0 and first is not None:
                    keys, hidden = first
                else:
                    layer_keys, collected = self._keys(
                        prompts, [layer], progress, hidden_layer=l_star, config=cfg
                    )
                    assert collected is not None
                    keys, hidden = layer_keys[layer], collected
                # Each layer takes an equal share of the gap still left at l* (the last layer takes the rest).
                shares = (targets - hidden) / (m - j)
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

    def _residual_base(self, model_print: str, templates: list[str], compute_dtype: torch.dtype) -> str:
        """The digest every residual-store key of this editor's edits starts from."""
        return ResidualStore.base(
            model_fingerprint=model_print,
            tokenizer_fingerprint=self.tokens.fingerprint(),
            tokens=self.tokens.describe(),
            templates=templates,
            config=self.config,
            compute_dtype=compute_dtype,
        )

    def _template_key(self, model_print: str) -> str:
        return template_key(
            model_fingerprint=model_print,
            tokenizer_fingerprint=self.tokens.fingerprint(),
            tokens=self.tokens.describe(),
            config=self.config,
        )


def _warn_not_landed(result: EditResult) -> None:
    """One warning naming the facts of ``result`` that did not land (none if every one did)."""
    if result.not_landed():
        warnings.warn(result.outcome_line(), NotLandedWarning, stacklevel=3)


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
