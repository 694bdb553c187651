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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eamet.choices import Method
from eamet.config import METHODS, EditConfig
from eamet.errors import NotLandedWarning, ParameterError
from eamet.metrics import RATE_KEYS

__all__ = [
    "RATE_KEYS",
    "ApplyEdit",
    "compare_edits",
    "format_table",
    "model_config",
    "run_demo",
    "run_edits",
]

QUICK_EDITS = 32
DEFAULT_DEMO_EDITS = 256
REAL_MODEL_EDITS = 32
REAL_MODEL_CORPUS = "cases"
"""C of a real model in the demo when no corpus is given: the texts of the cases not edited
(:meth:`EditCase.texts`). Measured as good as ``model:1000`` on SmolLM2 (docs/benchmarks.md) and free,
where sampling takes minutes."""
CASES_CORPUS_DOCUMENTS = 1000
"""How many of those texts C reads (``mom2_n_samples``), whatever the preset's sampled corpus takes: case
sentences are short (~10 tokens), and SmolLM2's d_ff = 1536 key dimensions need ~10k tokens to be of
full rank (200, the preset's number of sampled documents, leaves λC + KKᵀ singular)."""


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


def run_demo(
    *,
    model: str = "pocket",
    edits: int | None = None,
    methods: Sequence[str] = METHODS,
    data: str | Path | None = None,
    records: int | None = None,
    quick: bool = False,
    seed: int = 0,
    prefix_len: int = 0,
    arch: str = "llama",
    corpus: Any = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo: a model evaluated before editing, then edited with each method from the same unedited
    weights and evaluated again.

    Args:
        model: ``"pocket"`` (the sandbox's small model of a synthetic world, shipped) or a real model — a
            known name (``"smollm2"``: SmolLM2-135M through :mod:`eamet.models`) or a directory / hub id.
        edits: facts to edit (pocket: default 256, half the edited layers' d_ff, ``quick`` 32; a real model:
            default and ``quick`` 32).
        data: pocket: a CounterFact JSON file to build the world from; a real model: the CounterFact file
            whose cases are edited (default for a known model: the shipped cases it knows).
        records: how many of its records to use (default all).
        arch: the pocket model's architecture, "llama" or "gpt2" (the shipped model is LLaMA).
        corpus: a real model's corpus for C: ``"cases"`` (default, :data:`REAL_MODEL_CORPUS`: the texts of
            the cases not edited), ``"model:<n>"``, or a file; the pocket model uses its world's text.
        overrides: :class:`~eamet.config.EditConfig` settings for both methods (e.g. ``fact_batch``).

    Returns:
        The run's JSON (module docstring).
    """
    if model == "pocket":
        return _pocket_demo(
            edits, methods, data, records, quick, seed, prefix_len, arch, cache_dir, progress, log, overrides
        )
    return _real_demo(
        model, edits, methods, data, records, quick, seed, prefix_len, corpus, progress, log, overrides
    )


def _edit_count(edits: int | None, default: int, available: int) -> int:
    n = edits if edits is not None else min(default, available)
    if n < 1:
        raise ParameterError(f"edits must be >= 1, got {n}", argument="edits")
    if n > available:
        raise ParameterError(f"there are {available} edit cases, fewer than {n}", argument="edits")
    return n


def _pocket_demo(
    edits: int | None,
    methods: Sequence[str],
    data: str | Path | None,
    records: int | None,
    quick: bool,
    seed: int,
    prefix_len: int,
    arch: str,
    cache_dir: str | Path | None,
    progress: bool,
    log: Callable[[str], None],
    overrides: dict[str, Any] | None,
) -> dict[str, Any]:
    from eamet.sandbox.pocket import PocketSettings, default_world, edit_config, pocket_model, world_corpus
    from eamet.sandbox.world import World

    if data is not None:
        from eamet.records import load_dataset

        world = World.from_cases(load_dataset("counterfact", data, limit=records))
        source = str(data)
    else:
        world = default_world()
        source = "default world"
    n = _edit_count(edits, QUICK_EDITS if quick else DEFAULT_DEMO_EDITS, len(world.cases))
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
            "model": "pocket",
            "world": source,
            "world_fingerprint": world.fingerprint(),
            "pocket": settings.to_dict(),
        },
    )


def _real_demo(
    name: str,
    edits: int | None,
    methods: Sequence[str],
    data: str | Path | None,
    records: int | None,
    quick: bool,
    seed: int,
    prefix_len: int,
    corpus: Any,
    progress: bool,
    log: Callable[[str], None],
    overrides: dict[str, Any] | None,
) -> dict[str, Any]:
    from eamet.loading import load_model
    from eamet.models import known_by_name
    from eamet.records import cases_texts, dataset_kind, load_dataset

    known = known_by_name(name)
    if data is None and (known is None or known.known_facts is None):
        raise ParameterError(
            f"--data COUNTERFACT.json is needed for {name} (cases ship only for models eamet knows)",
            argument="data",
        )
    # Cases, edit count and corpus are checked before the (slow) model load.
    if data is not None:
        cases = load_dataset(dataset_kind(data), data, limit=records)
        source = str(data)
    else:
        from eamet.models import known_facts

        assert known is not None
        cases = known_facts(known, limit=records)
        source = f"CounterFact cases {known.name} knows (shipped)"
    n = _edit_count(edits, REAL_MODEL_EDITS, len(cases))
    used_corpus = corpus if corpus is not None else REAL_MODEL_CORPUS
    corpus_texts = cases_texts(cases[n:]) if used_corpus == "cases" else used_corpus
    if not corpus_texts:
        raise ParameterError(
            f"C from the cases not edited needs more than {n} cases; pass a corpus", argument="corpus"
        )
    start = time.perf_counter()
    model, tokenizer = load_model(name)
    log(f"{name} ready in {time.perf_counter() - start:.1f} s")
    log(f"cases: {source}, {len(cases)} in all; C from {used_corpus}")

    changes = {"mom2_n_samples": CASES_CORPUS_DOCUMENTS} if used_corpus == "cases" else {}
    changes.update(overrides or {})

    def config_for(m: Any, method: str) -> Any:
        return model_config(name, m, method).replace(**changes)  # type: ignore[arg-type]

    return run_edits(
        model,
        tokenizer,
        list(cases[:n]),
        methods=methods,
        config_for=config_for,
        corpus=corpus_texts,
        prefix_len=prefix_len,
        seed=seed,
        fluency=not quick,
        progress=progress,
        log=log,
        extra_config={"model": name, "data": source, "corpus": str(used_corpus)},
    )


def model_config(name: str, model: Any, method: Method = "eamet") -> EditConfig:
    """The settings eamet edits a model with (:func:`eamet.models.config_for`: a known model's preset —
    by ``name`` or recognised — else :meth:`EditConfig.for_model`)."""
    from eamet.models import config_for

    return config_for(model, method, name=name)


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
