"""Evaluation metrics (algorithm.md §8): teacher-forced scoring of targets, strict and lenient.

(The module is ``evaluation``, not ``evaluate``: ``eamet.evaluate`` is the public function, and a submodule
of that name would replace it on the package as soon as it is imported.)

Two notions of "correct", always reported side by side:

* **strict**: every target token is the arg-max at its position under teacher forcing — the same as
  greedy decoding emitting exactly the target right after the prompt;
* **lenient**: the target's mean per-token NLL is below the alternative's (new object vs true object;
  reversed for neighbourhood prompts, which must keep the true object).

Scoring is batched: prompts and targets are tokenised once (the edit's BOS policy and target-token rules,
:class:`~eamet.tokens.TokenAdapter`), grouped by length, right-padded, and read at positions
``len(prompt) + j - 1`` for target token ``j``.

:func:`evaluate` runs the whole protocol (efficacy, generalisation, specificity, fluency) on
:class:`~eamet.records.EditCase` records and returns an :class:`EvaluationReport`; see docs/evaluation.md.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eamet._progress import progress_callback
from eamet.batching import length_sorted_batches, pad_right
from eamet.errors import FactError, ParameterError
from eamet.facts import SUBJECT_SLOT
from eamet.metrics import KINDS, METRICS, RATE_KEYS, Rate, RecordMetrics
from eamet.parts import eval_mode
from eamet.records import EditCase, case_from_record
from eamet.templates import generate_templates
from eamet.tokens import TokenAdapter

__all__ = [
    "EVAL_PREFIX_SEEDS",
    "EvaluationReport",
    "TargetScores",
    "as_cases",
    "evaluate",
    "evaluation_prefixes",
    "known_cases",
    "lenient_correct",
    "ngram_entropy",
    "score_targets",
]

# The reference evaluation's prefix seed words (algorithm.md §8.4).
EVAL_PREFIX_SEEDS = (
    "The",
    "Therefore",
    "You",
    "However",
    "And",
    "While",
    "To",
    "Nevertheless",
    "Never",
    "He",
)


@dataclass(frozen=True)
class TargetScores:
    """Per (prompt, target) pair, in input order.

    Attributes:
        nll: (B,) float64 mean per-token negative log-likelihood of the target after the prompt.
        strict: (B,) bool, every target token is the arg-max at its position.
        token_hits: per pair, a (T_b,) bool tensor: which target tokens are the arg-max.
    """

    nll: torch.Tensor
    strict: torch.Tensor
    token_hits: list[torch.Tensor]


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tokens: TokenAdapter,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 40,
    on_batch: Callable[[int], None] | None = None,
) -> TargetScores:
    """Teacher-forced scores of ``targets[b]`` as the continuation of ``prompts[b]``.

    Each sequence is ``encode(prompt) + target_ids(target)[:-1]``: the last target token is predicted, never
    read. Runs in eval mode without gradients, ``batch_size`` sequences of similar length per forward.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V).
        tokens: the tokenisation (BOS policy, target ids).
        prompts: B filled prompts (no target).
        targets: B targets (a leading space is implied, as for edits).
        on_batch: called after each forward with the number of pairs it scored (progress bars).

    Returns:
        :class:`TargetScores`. Raises ``ParameterError`` for mismatched lengths or an empty prompt.
    """
    if len(prompts) != len(targets):
        raise ParameterError(f"{len(prompts)} prompts but {len(targets)} targets", argument="targets")
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}", argument="batch_size")
    encoded = []
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        prompt_ids, target_ids = tokens.encode(prompt), tokens.target_ids(target)
        if not prompt_ids:
            raise ParameterError(f"prompt {row} ({prompt!r}) encodes to no tokens", argument="prompts")
        encoded.append((prompt_ids, target_ids))
    device = next(model.parameters()).device
    n = len(encoded)
    nll = torch.zeros(n, dtype=torch.float64)
    hits: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * n
    lengths = [len(p) + len(t) - 1 for p, t in encoded]
    with eval_mode(model):
        for batch in length_sorted_batches(lengths, max_items=batch_size):
            seqs = [encoded[i][0] + encoded[i][1][:-1] for i in batch]
            inputs = pad_right(seqs, tokens.pad_id, device)
            log_probs = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
            for row, i in enumerate(batch):
                prompt_ids, target_ids = encoded[i]
                positions = torch.arange(len(target_ids), device=device) + len(prompt_ids) - 1
                wanted = torch.tensor(target_ids, device=device)
                scores = log_probs[row, positions]
                nll[i] = -scores.gather(1, wanted[:, None]).double().mean().cpu()
                hits[i] = (scores.argmax(dim=-1) == wanted).cpu()
            if on_batch is not None:
                on_batch(len(batch))
    strict = torch.tensor([bool(h.all()) for h in hits], dtype=torch.bool)
    return TargetScores(nll=nll, strict=strict, token_hits=hits)


def lenient_correct(nll_wanted: torch.Tensor, nll_other: torch.Tensor, *, ties: bool = True) -> torch.Tensor:
    """(B,) bool: the wanted object is at least as likely per token as the other.

    Efficacy and generalisation: wanted = new object, other = true object, ties count (the reference's
    ``NLL_new <= NLL_true``). Specificity: wanted = true object, other = new object, ``ties=False`` (the
    reference's ``NLL_new > NLL_true``).
    """
    return nll_wanted <= nll_other if ties else nll_wanted < nll_other


def evaluation_prefixes(
    model: nn.Module,
    tokens: TokenAdapter,
    length: int,
    *,
    seed: int | None = 0,
    seeds: Sequence[str] = EVAL_PREFIX_SEEDS,
) -> list[str]:
    """Prefixes put before evaluation prompts (algorithm.md §8.4), generated from ``model`` — call it before
    editing — by sampling ``length`` tokens after each seed word (temperature 0.7, top-k 50, top-p 0.9).

    Returns ``["<text>. ", ...]`` (one per seed word), or ``[""]`` (the bare prompt) when ``length`` is 0.
    Seeded (``seed=None`` samples unseeded, as the reference does).
    """
    if length < 0:
        raise ParameterError(f"prefix length must be >= 0, got {length}", argument="length")
    if length == 0:
        return [""]
    templates = generate_templates(
        model, tokens, seeds, length=length, temperature=0.7, top_k=50, top_p=0.9, seed=seed
    )
    return [t[: -len(SUBJECT_SLOT)] for t in templates[1:]]


# Words and single punctuation marks: a dependency-free stand-in for NLTK's word_tokenize (which the
# reference calls); they differ on contractions ("don't" -> "don", "'", "t" here, "do", "n't" in NLTK).
_WORDS = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str) -> float:
    """The reference's fluency score of one text (algorithm.md §8.3): (2/3·H₂ + 4/3·H₃) / 2, where Hₙ is
    the Shannon entropy in bits of the text's n-gram frequency distribution. 0 for texts too short to
    hold a bigram; a text repeating itself scores low.
    """
    words = _WORDS.findall(text)
    weighted = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / 2


# -- the evaluation protocol -------------------------------------------------------------------------------

# The reference truncates generation inputs to this many tokens (algorithm.md §8.3).
MAX_GENERATION_PROMPT_TOKENS = 256


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
        tokenizer: its Hugging Face tokenizer, or a :class:`~eamet.tokens.TokenAdapter` (BOS policy).
        records: N edit cases; dicts are read with :func:`~eamet.records.case_from_record`.
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
    given = None if prefixes is None else _check_prefixes(prefixes)
    tokens = tokenizer if isinstance(tokenizer, TokenAdapter) else TokenAdapter(tokenizer)
    with eval_mode(model), torch.no_grad():
        used = given if given is not None else evaluation_prefixes(model, tokens, prefix_len, seed=seed)
        rows = _evaluate_cases(model, tokens, cases, used, fluency, generation_tokens, batch_size, progress)
    return EvaluationReport(per_record=rows, prefixes=tuple(used), prefix_len=prefix_len)


def as_cases(records: Sequence[EditCase | Mapping[str, Any]], *, what: str = "evaluate") -> list[EditCase]:
    """``records`` as edit cases: ``EditCase`` items kept, dicts read with
    :func:`~eamet.records.case_from_record`. Raises ``ParameterError`` for an empty sequence ("no records
    to ``what``") or an item of another type, ``FactError`` for a dict that cannot be read.
    """
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise ParameterError(
            f"records must be a sequence of EditCase (or record dicts), got {type(records).__name__}",
            argument="records",
        )
    cases = []
    for row, item in enumerate(records):
        if isinstance(item, EditCase):
            cases.append(item)
        elif isinstance(item, Mapping):
            cases.append(case_from_record(item, row))
        else:
            raise ParameterError(
                f"record {row}: expected an EditCase or a dict, got {type(item).__name__}",
                argument="records",
                row=row,
            )
    if not cases:
        raise ParameterError(f"no records to {what}", argument="records")
    return cases


def _check_prefixes(prefixes: Sequence[str]) -> list[str]:
    if isinstance(prefixes, str):
        raise ParameterError("prefixes must be a list of strings, not one string", argument="prefixes")
    out = list(prefixes)
    if not out or not all(isinstance(p, str) for p in out):
        raise ParameterError(
            f"prefixes must be a non-empty list of strings ([''] for none), got {prefixes!r}",
            argument="prefixes",
        )
    return out


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
        texts = _greedy_texts(
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


@torch.no_grad()
def _greedy_texts(
    model: nn.Module,
    tokens: TokenAdapter,
    prompts: Sequence[str],
    *,
    new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    use_generate: bool | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (each encoded with the BOS policy and truncated to its first
    256 tokens, as the reference), decoded together with the prompt, special tokens skipped.

    Prompts are batched by exact token length, so no sequence is padded and positions are those of an
    unbatched run on every architecture. Generation stops at EOS (the rest of the row is dropped).
    ``model.generate(do_sample=False)`` (with its KV cache) is used when the model has it, else a
    cache-free arg-max loop; ``use_generate`` forces one or the other.

    Returns ``len(prompts)`` texts, in input order.
    """
    if not prompts:
        return []
    encoded = [tokens.encode(p)[:MAX_GENERATION_PROMPT_TOKENS] for p in prompts]
    for row, seq in enumerate(encoded):
        if not seq:
            raise ParameterError(f"generation prompt {row} ({prompts[row]!r}) encodes to no tokens")
    if use_generate is None:
        use_generate = callable(getattr(model, "generate", None))
    device = next(model.parameters()).device
    eos = tokens.tokenizer.eos_token_id
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(encoded):
        by_length.setdefault(len(seq), []).append(i)
    texts = [""] * len(prompts)
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            inputs = torch.tensor([encoded[i] for i in batch], dtype=torch.long, device=device)
            if use_generate:
                generate: Callable[..., torch.Tensor] = getattr(model, "generate")  # noqa: B009
                out = generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokens.pad_id,
                    return_dict_in_generate=False,
                )
            else:
                out = inputs
                for _ in range(new_tokens):
                    logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
                    out = torch.cat([out, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
                    if eos is not None and bool((out[:, length:] == eos).any(dim=1).all()):
                        break
            for row, i in enumerate(batch):
                new = out[row, length:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                texts[i] = str(tokens.tokenizer.decode(encoded[i] + new, skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(batch))
    return texts


# -- facts the model knows ---------------------------------------------------------------------------------


def known_cases(
    model: nn.Module,
    tokenizer: Any,
    cases: Sequence[EditCase | Mapping[str, Any]],
    *,
    prefixes: Sequence[str] = (),
    batch_size: int = 40,
    limit: int | None = None,
) -> list[EditCase]:
    """The cases whose *true* object the model gives strictly: every token of ``rewrite.target_true`` is
    the arg-max after the rewrite prompt under teacher forcing (greedy decoding emits it), as
    :func:`score_targets` scores it. Causal tracing (:func:`eamet.trace`) is meant for such facts.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V).
        tokenizer: its tokenizer, or a :class:`~eamet.tokens.TokenAdapter` (BOS policy).
        cases: edit cases (or record dicts), each with a true object.
        prefixes: texts put before the rewrite prompt; a case must be known after every one of them
            (``()``: the bare prompt only; include ``""`` to require the bare prompt as well).
        batch_size: sequences per forward.
        limit: stop once this many known cases are found (the cases are scored in chunks, in order).

    Returns:
        The known cases, in input order (at most ``limit``).

    Raises:
        ParameterError: no cases, ``batch_size < 1``, ``limit < 1``, or bad ``prefixes``.
        FactError: a case without a true object (zsRE records have none: "known" is undefined for them,
            and dropping them silently would hide that the file holds no usable record); ``row`` names it.
    """
    chosen = as_cases(cases, what="check")
    used = [""] if not isinstance(prefixes, str) and len(prefixes) == 0 else _check_prefixes(prefixes)
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}", argument="batch_size")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ParameterError(f"limit must be None or an integer >= 1, got {limit!r}", argument="limit")
    for row, case in enumerate(chosen):
        true = case.rewrite.target_true
        if true is None or not true.strip():
            raise FactError(
                f"record {row} (case {case.case_id}): has no true object, so whether the model knows it is "
                "undefined (a JSONL fact needs a target_true field; zsRE records have none)",
                row=row,
            )
    tokens = tokenizer if isinstance(tokenizer, TokenAdapter) else TokenAdapter(tokenizer)
    chunk = len(chosen) if limit is None else max(limit, batch_size)
    known: list[EditCase] = []
    for start in range(0, len(chosen), chunk):
        part = chosen[start : start + chunk]
        prompts = [p + case.rewrite.text for case in part for p in used]
        targets = [str(case.rewrite.target_true) for case in part for _ in used]
        strict = score_targets(model, tokens, prompts, targets, batch_size=batch_size).strict
        for i, case in enumerate(part):
            if bool(strict[i * len(used) : (i + 1) * len(used)].all()):
                known.append(case)
                if limit is not None and len(known) == limit:
                    return known
    return known
