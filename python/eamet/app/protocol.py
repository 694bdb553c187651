"""Before/after editing runs: ``eamet demo`` (the sandbox) and ``eamet eval`` (any model and data file).

Both follow the same protocol: evaluation prefixes are generated once from the unedited model; the model is
evaluated before editing; each method then edits the same facts into the same unedited model, is evaluated,
and is undone. Results are the JSON of design.md §2::

    {"config": {...}, "before": {<metrics>}, "results": {"eamet": {<metrics>}, "memit": {<metrics>}}}

where every ``<metrics>`` holds ``efficacy_strict``, ``efficacy_lenient``, ``generalization_strict``,
``generalization_lenient``, ``specificity_strict``, ``specificity_lenient`` and ``fluency``; the edited
entries add ``misalignment_total`` and ``edit_seconds`` (the edit's own time; the covariance statistics,
shared by both methods, are collected beforehand). The unedited model has neither. A value is ``null`` where
it does not exist: fluency when not measured (``--quick``), lenient rates on zsRE (no true object).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from eamet.base.errors import NotLandedWarning, ParameterError
from eamet.base.settings import METHODS

__all__ = ["ApplyEdit", "compare_edits", "run_edits"]


# Applies one edit to the model and returns it (applied, so it can be undone) with the seconds it took
# (None when the edit was made elsewhere, e.g. loaded from a file).
ApplyEdit = Callable[[], tuple[Any, float | None]]


def compare_edits(
    model: Any,
    tokenizer: Any,
    cases: Sequence[Any],
    edits: Sequence[tuple[str, ApplyEdit]],
    *,
    prefix_len: int,
    seed: int,
    fluency: bool,
    progress: bool,
    log: Callable[[str], None],
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The before/after protocol: evaluates ``model`` on ``cases``, then for each named edit: applies it,
    evaluates, undoes it (also on failure or Ctrl-C, so the model is left as it was).

    Args:
        cases: N :class:`~eamet.base.records.EditCase`, all evaluated.
        edits: ``(name, apply)`` pairs, in order; ``apply()`` edits the model and returns the applied
            :class:`~eamet.edit.results.EditResult` and its seconds (or ``None``).

    Returns:
        The run's JSON (module docstring); ``config`` records each edit's settings as ``<name>_config``.
    """
    from eamet.measure.evaluation import evaluate
    from eamet.measure.generation import evaluation_prefixes
    from eamet.model.tokens import TokenAdapter

    if not cases:
        raise ParameterError("no edit cases to run")
    prefixes = evaluation_prefixes(model, TokenAdapter(tokenizer), prefix_len, seed=seed)

    def measure() -> dict[str, Any]:
        report = evaluate(
            model,
            tokenizer,
            cases,
            prefixes=prefixes,
            prefix_len=prefix_len,
            fluency=fluency,
            progress=progress,
        )
        return report.metrics()

    log(f"evaluating the unedited model on {len(cases)} cases (prefix length {prefix_len})")
    out: dict[str, Any] = {
        "config": {
            "edits": len(cases),
            "methods": [name for name, _ in edits],
            "prefix_len": prefix_len,
            "prefixes": list(prefixes),
            "seed": seed,
            **(extra_config or {}),
        },
        "before": measure(),
        "results": {},
    }
    for name, apply in edits:
        result, seconds = apply()
        try:
            out["config"][f"{name}_config"] = result.config.to_dict()
            metrics = measure()
            report = result.misalignment
            metrics["misalignment_total"] = float(report.total) if report is not None else None
            metrics["edit_seconds"] = seconds
        finally:
            result.undo()
        out["results"][name] = metrics
    return out


def run_edits(
    model: Any,
    tokenizer: Any,
    cases: Sequence[Any],
    *,
    methods: Sequence[str],
    config_for: Callable[[Any, str], Any],
    corpus: Any,
    prefix_len: int,
    seed: int,
    fluency: bool,
    progress: bool,
    log: Callable[[str], None],
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`compare_edits` of each method editing every case's rewrite into the unedited model.

    Args:
        methods: "eamet" and/or "memit", in order.
        config_for: ``(model, method) -> EditConfig``.
        corpus: the corpus for C (see :class:`~eamet.edit.editor.Editor`).
        Others: as :func:`compare_edits`.
    """
    from eamet.edit.editor import Editor

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ParameterError(
            f"methods must be among {', '.join(METHODS)}; got {list(methods)}", argument="methods"
        )

    def by(method: str) -> ApplyEdit:
        def apply() -> tuple[Any, float | None]:
            config = config_for(model, method)
            log(f"editing {len(cases)} facts with {method} (blocks {list(config.layers)})")
            editor = Editor(model, tokenizer, config=config, corpus=corpus)
            # C depends only on the model and corpus, so the second method loads the first one's from the
            # cache: collect it outside the timing to compare the methods' own work.
            editor.covariance(progress=progress)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotLandedWarning)  # said below, in the run's own words
                result = editor.edit([case.rewrite for case in cases], progress=progress)
            seconds = time.perf_counter() - start
            log(f"{method}: {result.outcome_line()}")
            return result, seconds

        return apply

    return compare_edits(
        model,
        tokenizer,
        cases,
        [(method, by(method)) for method in methods],
        prefix_len=prefix_len,
        seed=seed,
        fluency=fluency,
        progress=progress,
        log=log,
        extra_config=extra_config,
    )
