"""The evaluation protocol (algorithm.md §8): efficacy, generalisation, specificity and fluency of an edit on
:class:`~eamet.base.records.EditCase` records, as an :class:`EvaluationReport` (docs/evaluation.md).

(The module is ``evaluation``, not ``evaluate``: ``eamet.evaluate`` is the public function, and a submodule
of that name would replace it on the package as soon as it is imported.)

Two notions of "correct", always reported side by side (:mod:`eamet.model.scoring` computes both):

* **strict**: every target token is the arg-max at its position under teacher forcing — the same as
  greedy decoding emitting exactly the target right after the prompt;
* **lenient**: the target's mean per-token NLL is below the alternative's (new object vs true object;
  reversed for neighbourhood prompts, which must keep the true object).

Every prompt is scored after each of the prefixes (:mod:`eamet.measure.generation`), which are sampled once
from the unedited model and must be the same before and after the edit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eamet.base.errors import ParameterError
from eamet.base.metrics import KINDS, METRICS, RATE_KEYS, Rate, RecordMetrics
from eamet.base.progress import progress_callback
from eamet.base.records import EditCase, as_cases
from eamet.measure.generation import check_prefixes, evaluation_prefixes, greedy_texts, ngram_entropy
from eamet.model.parts import eval_mode
from eamet.model.scoring import TargetScores, lenient_correct, score_targets
from eamet.model.tokens import TokenAdapter

__all__ = ["EvaluationReport", "evaluate"]


@dataclass(frozen=True)
class EvaluationReport:
    """What :func:`evaluate` measured: per-record rates, aggregated on demand.

    Attributes:
        per_record: one dict per record, in input order: ``case_id``, ``kind``, and ``efficacy_strict``,
            ``efficacy_lenient``, ``generalization_strict``, ``generalization_lenient``,
            ``specificity_strict``, ``specificity_lenient``, ``fluency``. Rates are in [0, 1] (fluency in
            bits); ``None`` where the record has nothing to measure (no paraphrases, no neighbours), where
            the metric is undefined (lenient for zsRE, or without a true object) or not run (fluency).
        prefixes: the evaluation prefixes put before CounterFact rewrite and neighbourhood prompts
            (``("",)``: none).
        prefix_len: the prefix length the caller asked for (reported as given).
    """

    per_record: list[dict[str, Any]]
    prefixes: tuple[str, ...]
    prefix_len: int

    @property
    def summary(self) -> dict[str, Any]:
        """``{"efficacy": {"strict", "lenient"}, "generalization": {...}, "specificity": {...}, "fluency",
        "n_records", "prefix_len"}``: each rate is the mean over the records that have it (each record
        first averaged over its own prompts), ``None`` if no record has it.
        """
        out: dict[str, Any] = {m: {k: self._mean(f"{m}_{k}") for k in KINDS} for m in METRICS}
        out["fluency"] = self._mean("fluency")
        out["n_records"] = len(self.per_record)
        out["prefix_len"] = self.prefix_len
        return out

    def metrics(self) -> dict[str, float | None]:
        """Flat ``{"efficacy_strict", "efficacy_lenient", "generalization_strict", "generalization_lenient",
        "specificity_strict", "specificity_lenient", "fluency"}`` (the keys of ``eamet demo --json``)."""
        return {key: self._mean(key) for key in (*RATE_KEYS, "fluency")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"summary", "prefixes", "per_record"}``."""
        return {
            "summary": self.summary,
            "prefixes": list(self.prefixes),
            "per_record": [dict(row) for row in self.per_record],
        }

    def _mean(self, key: str) -> float | None:
        values = [row[key] for row in self.per_record if row[key] is not None]
        return sum(values) / len(values) if values else None


class _Pairs:
    """(prompt, target) pairs of one metric kind, scored together by one :func:`score_targets` call."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.targets: list[str] = []

    def add(self, prompt: str, target: str) -> int:
        self.prompts.append(prompt)
        self.targets.append(target)
        return len(self.prompts) - 1

    def pair(self, prompt: str, wanted: str, other: str | None) -> tuple[int, int | None]:
        """Adds (prompt, wanted) and, if given, (prompt, other); returns their indices."""
        return self.add(prompt, wanted), None if other is None else self.add(prompt, other)

    def __len__(self) -> int:
        return len(self.prompts)


# Per record and metric: (wanted pair, other pair or None). Strict reads `wanted`; lenient compares the two.
_Plan = dict[str, list[tuple[int, int | None]]]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditCase | Mapping[str, Any]],
    *,
    prefix_len: int = 0,
    prefixes: Sequence[str] | None = None,
    seed: int | None = 0,
    fluency: bool = True,
    generation_tokens: int = 64,
    batch_size: int = 40,
    progress: bool = True,
) -> EvaluationReport:
    """Evaluates ``model`` on edit cases with the reference protocol (algorithm.md §8), bugs fixed.

    Per record (each then averaged over records; a record without paraphrases or neighbours does not
    count for that metric):

    * **efficacy**: the rewrite prompt (CounterFact: each prefix + the prompt) → the new object;
    * **generalization**: each paraphrase (never prefixed) → the new object;
    * **specificity**: each neighbourhood prompt (CounterFact: × prefixes) → its expected object;
    * **strict**: every target token is the arg-max under teacher forcing (greedy decoding emits the
      target). **lenient**: mean per-token NLL of new ≤ true (efficacy, generalisation), expected < new
      (specificity). For zsRE, lenient is ``None`` (there is no true object) and specificity is the
      per-token arg-max accuracy of the neighbour's answer, averaged over its tokens — computed from the
      same teacher-forced pass, not by re-tokenising decoded pieces as the reference does;
    * **fluency**: the n-gram entropy (:func:`ngram_entropy`) of the greedy continuation
      (``generation_tokens`` new tokens) of each generation prompt — the rewrite prompt when a record has
      none — decoded together with the prompt.

    Scoring runs as one batched :func:`score_targets` call per metric (``batch_size`` sequences per
    forward) and batched greedy generation; the model is put in eval mode, without gradients, and its
    mode is restored. Deterministic for a ``seed``.

    Args:
        model: a causal LM (``.logits`` of shape (B, T, V)); Hugging Face models generate with
            ``model.generate``, others with a cache-free greedy loop.
        tokenizer: its Hugging Face tokenizer, or a :class:`~eamet.model.tokens.TokenAdapter` (BOS policy).
        records: N edit cases; dicts are read with :func:`~eamet.base.records.case_from_record`.
        prefix_len: tokens sampled per evaluation prefix (0: bare prompts). Ignored if ``prefixes`` is
            given.
        prefixes: evaluation prefixes to use as they are. Generate them once from the *unedited* model with
            :func:`evaluation_prefixes` and pass the same list before and after editing; by default they
            are generated here, from ``model``, with ``seed``.
        seed: seed of the prefix sampling.
        fluency: run the generation test (``False``: fluency is ``None``).
        generation_tokens: new tokens per generation.
        batch_size: sequences per forward (scoring and generation).
        progress: show a progress bar.

    Returns:
        :class:`EvaluationReport` (``summary``, ``metrics()``, ``per_record``, ``prefixes``).

    Raises:
        ParameterError: no records, ``prefix_len < 0``, ``generation_tokens < 1``, ``batch_size < 1``,
            empty or non-string ``prefixes``, or an item that is neither an ``EditCase`` nor a dict.
        FactError: a dict record cannot be read (``row`` names it).
    """
    cases = as_cases(records)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ParameterError(f"prefix_len must be an integer >= 0, got {prefix_len!r}", argument="prefix_len")
    if generation_tokens < 1:
        raise ParameterError(
            f"generation_tokens must be >= 1, got {generation_tokens}", argument="generation_tokens"
        )
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}", argument="batch_size")
    given = None if prefixes is None else check_prefixes(prefixes)
    tokens = TokenAdapter.of(tokenizer)
    with eval_mode(model), torch.no_grad():
        used = given if given is not None else evaluation_prefixes(model, tokens, prefix_len, seed=seed)
        rows = _evaluate_cases(model, tokens, cases, used, fluency, generation_tokens, batch_size, progress)
    return EvaluationReport(per_record=rows, prefixes=tuple(used), prefix_len=prefix_len)


def _evaluate_cases(
    model: nn.Module,
    tokens: TokenAdapter,
    cases: list[EditCase],
    prefixes: list[str],
    fluency: bool,
    generation_tokens: int,
    batch_size: int,
    progress: bool,
) -> list[dict[str, Any]]:
    pairs = {m: _Pairs() for m in METRICS}
    plans: list[_Plan] = []
    for case in cases:
        counterfact = case.kind == "counterfact"
        new = case.rewrite.target
        # Lenient efficacy and generalisation compare against the true object, if the protocol has one.
        true = case.rewrite.target_true if counterfact else None
        before = prefixes if counterfact else [""]
        efficacy, paraphrase, hood = pairs["efficacy"], pairs["generalization"], pairs["specificity"]
        plans.append(
            {
                "efficacy": [efficacy.pair(p + case.rewrite.text, new, true) for p in before],
                "generalization": [paraphrase.pair(q, new, true) for q in case.paraphrases],
                "specificity": [
                    hood.pair(p + q, expected, new if counterfact else None)
                    for p in before
                    for q, expected in case.neighborhood
                ],
            }
        )
    generation = [case.generation_prompts or (case.rewrite.text,) for case in cases] if fluency else []
    total = sum(len(p) for p in pairs.values()) + sum(len(g) for g in generation)
    with progress_callback(progress, "evaluate", unit="seq") as callback:
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if callback is not None:
                callback(done, total)

        scores = {
            m: score_targets(model, tokens, p.prompts, p.targets, batch_size=batch_size, on_batch=advance)
            for m, p in pairs.items()
            if len(p)
        }
        flat = [prompt for prompts in generation for prompt in prompts]
        texts = greedy_texts(
            model, tokens, flat, new_tokens=generation_tokens, batch_size=batch_size, on_batch=advance
        )
    fluencies: list[float | None] = [None] * len(cases)
    if fluency:
        start = 0
        for i, prompts in enumerate(generation):
            entropies = [ngram_entropy(text) for text in texts[start : start + len(prompts)]]
            start += len(prompts)
            fluencies[i] = sum(entropies) / len(entropies)
    rows = []
    for case, plan, fluent in zip(cases, plans, fluencies, strict=True):
        rates = {metric: _rate(case, metric, plan[metric], scores.get(metric)) for metric in METRICS}
        rows.append(RecordMetrics(case.case_id, case.kind, **rates, fluency=fluent).flat())
    return rows


def _rate(
    case: EditCase, metric: str, items: list[tuple[int, int | None]], scores: TargetScores | None
) -> Rate:
    """One record's strict and lenient rate of ``metric`` from its scored pairs (wanted, other)."""
    if not items or scores is None:
        return Rate()
    if metric == "specificity" and case.kind == "zsre":
        hits = torch.cat([scores.token_hits[w] for w, _ in items])
        strict = float(hits.double().mean())
    else:
        strict = float(scores.strict[[w for w, _ in items]].double().mean())
    lenient = None
    if all(o is not None for _, o in items):
        wanted = scores.nll[[w for w, _ in items]]
        other = scores.nll[[o for _, o in items if o is not None]]
        lenient = float(lenient_correct(wanted, other, ties=metric != "specificity").double().mean())
    return Rate(strict, lenient)
