"""``eamet demo``: the before/after protocol (:mod:`eamet.app.protocol`) on the sandbox's pocket model and
its fact world, or on a known real model and its known CounterFact cases (``--model smollm2``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eamet.app.protocol import run_edits
from eamet.base.errors import ParameterError
from eamet.base.settings import METHODS

__all__ = [
    "CASES_CORPUS_DOCUMENTS",
    "DEFAULT_DEMO_EDITS",
    "QUICK_EDITS",
    "REAL_MODEL_CORPUS",
    "REAL_MODEL_EDITS",
    "run_demo",
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
        overrides: :class:`~eamet.base.settings.EditConfig` settings for both methods (e.g. ``fact_batch``).

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
        from eamet.base.records import load_dataset

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
    from eamet.app.loading import load_model
    from eamet.base.records import cases_texts, dataset_kind, load_dataset
    from eamet.models import config_for, known_by_name

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

    def settings_for(m: Any, method: str) -> Any:
        return config_for(m, method, name=name).replace(**changes)  # type: ignore[arg-type]

    return run_edits(
        model,
        tokenizer,
        list(cases[:n]),
        methods=methods,
        config_for=settings_for,
        corpus=corpus_texts,
        prefix_len=prefix_len,
        seed=seed,
        fluency=not quick,
        progress=progress,
        log=log,
        extra_config={"model": name, "data": source, "corpus": str(used_corpus)},
    )
