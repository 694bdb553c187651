"""Which facts a model already knows: the records whose true object is the model's greedy answer, the ones
causal tracing and the real-model demo work with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from eamet.base.errors import FactError, ParameterError
from eamet.base.records import EditCase, as_cases
from eamet.measure.generation import check_prefixes
from eamet.model.scoring import score_targets
from eamet.model.tokens import TokenAdapter

__all__ = ["known_cases"]


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
        tokenizer: its tokenizer, or a :class:`~eamet.model.tokens.TokenAdapter` (BOS policy).
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
    used = [""] if not isinstance(prefixes, str) and len(prefixes) == 0 else check_prefixes(prefixes)
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
    tokens = TokenAdapter.of(tokenizer)
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
