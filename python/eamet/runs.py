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

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eamet.config import METHODS
from eamet.errors import ParameterError
from eamet.metrics import RATE_KEYS

__all__ = ["RATE_KEYS", "ApplyEdit", "compare_edits", "format_table", "run_demo", "run_edits"]

QUICK_EDITS = 32
DEFAULT_DEMO_EDITS = 256


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
        cases: N :class:`~eamet.records.EditCase`, all evaluated.
        edits: ``(name, apply)`` pairs, in order; ``apply()`` edits the model and returns the applied
            :class:`~eamet.results.EditResult` and its seconds (or ``None``).

    Returns:
        The run's JSON (module docstring); ``config`` records each edit's settings as ``<name>_config``.
    """
    from eamet.evaluation import evaluate, evaluation_prefixes
    from eamet.tokens import TokenAdapter

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
        corpus: the corpus for C (see :class:`~eamet.editor.Editor`).
        Others: as :func:`compare_edits`.
    """
    from eamet.editor import Editor

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
            result = editor.edit([case.rewrite for case in cases], progress=progress)
            return result, time.perf_counter() - start

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


def run_demo(
    *,
    edits: int | None = None,
    methods: Sequence[str] = METHODS,
    data: str | Path | None = None,
    records: int | None = None,
    quick: bool = False,
    seed: int = 0,
    prefix_len: int = 0,
    arch: str = "llama",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sandbox demo: the default world's pocket model (or a world built from a CounterFact file),
    evaluated before editing, then edited with each method from the same unedited weights.

    Args:
        edits: facts to edit (default 256, half the edited layers' d_ff; ``quick``: 32).
        data: a CounterFact JSON file (ROME or EasyEdit form) to build the world from instead.
        records: how many of its records to use (default all).
        arch: the pocket model's architecture, "llama" or "gpt2" (the shipped model is LLaMA).
        overrides: :class:`~eamet.config.EditConfig` settings for both methods (e.g. ``fact_batch``).

    Returns:
        The run's JSON (module docstring).
    """
    from eamet.sandbox.pocket import PocketSettings, default_world, edit_config, pocket_model, world_corpus
    from eamet.sandbox.world import World

    if data is not None:
        from eamet.records import load_dataset

        world = World.from_cases(load_dataset("counterfact", data, limit=records))
        source = str(data)
    else:
        world = default_world()
        source = "default world"
    n = edits if edits is not None else min(QUICK_EDITS if quick else DEFAULT_DEMO_EDITS, len(world.cases))
    if n < 1:
        raise ParameterError(f"edits must be >= 1, got {n}", argument="edits")
    if n > len(world.cases):
        raise ParameterError(f"the world has {len(world.cases)} edit cases, fewer than {n}", argument="edits")
    settings = PocketSettings(arch=arch)  # type: ignore[arg-type]
    log(f"world: {source}, {len(world.facts)} facts, {len(world.cases)} edit cases")
    start = time.perf_counter()
    model, tokenizer = pocket_model(world, settings=settings, cache_dir=cache_dir, progress=progress)
    log(f"pocket model ready in {time.perf_counter() - start:.1f} s")
    return run_edits(
        model,
        tokenizer,
        list(world.cases[:n]),
        methods=methods,
        config_for=lambda m, method: edit_config(m, method, **(overrides or {})),  # type: ignore[arg-type]
        corpus=world_corpus(world),
        prefix_len=prefix_len,
        seed=seed,
        fluency=not quick,
        progress=progress,
        log=log,
        extra_config={
            "world": source,
            "world_fingerprint": world.fingerprint(),
            "pocket": settings.to_dict(),
        },
    )


def _cell(value: Any, form: str = "{:.3f}") -> str:
    return "—" if value is None else form.format(value) if isinstance(value, float) else str(value)


def format_table(run: dict[str, Any]) -> str:
    """The run as a text table: one row per model state (before, then each method), strict and lenient
    side by side."""
    header = [
        "",
        "eff strict",
        "eff lenient",
        "gen strict",
        "gen lenient",
        "spec strict",
        "spec lenient",
        "fluency",
        "misalign",
        "seconds",
    ]
    rows = [
        [
            "before",
            *(_cell(run["before"].get(k)) for k in RATE_KEYS),
            _cell(run["before"].get("fluency")),
            "",
            "",
        ]
    ]
    for method, metrics in run["results"].items():
        rows.append(
            [
                method,
                *(_cell(metrics.get(k)) for k in RATE_KEYS),
                _cell(metrics.get("fluency")),
                _cell(metrics.get("misalignment_total"), "{:.4g}"),
                _cell(metrics.get("edit_seconds"), "{:.1f}"),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(run: dict[str, Any], path: str | Path) -> None:
    """Writes the run's JSON (indented)."""
    Path(path).write_text(json.dumps(run, indent=1) + "\n")
