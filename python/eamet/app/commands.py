"""The ``eamet`` commands: one function per subcommand, taking the parsed arguments and returning the exit
status (:mod:`eamet.app.parser` builds the parser that names them)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eamet.base.errors import EametError, NotLandedWarning
from eamet.base.settings import METHODS
from eamet.kernels.diagnostics import (
    MisalignmentReport,
    kernel_threads,
    misalignment,
)

__all__ = ["capacity", "demo", "diagnose", "edit", "evaluate", "stats", "trace"]


def _load_matrix(path: str) -> np.ndarray:
    # Memory-mapped: the core reads float32/float64 files in place, so only its normalised copy is made.
    loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise EametError(f"{path}: expected a .npy file holding one array, got an .npz archive", path=path)
    return np.asarray(loaded)


def _format_report(report: MisalignmentReport, worst: int, widths: tuple[int, int]) -> str:
    support = "j < i (progressive)" if report.progressive else "j != i"
    q = report.quantiles()
    lines = [
        f"facts N = {len(report)}   key dim = {widths[0]}   residual dim = {widths[1]}   "
        f"tau = {report.tau:g}   M = {report.top_m}   support {support}",
        "misalignment A(i) = KL(P_r(i) || P_k(i))",
        f"  total      {report.total:.6g}",
        f"  mean       {report.mean:.6g}",
        "  quantiles  " + "  ".join(f"{k} {v:.4g}" for k, v in q.items()),
        f"  reverse KL(P_k || P_r) total {float(report.reverse_scores.sum()):.6g}",
        f"top-{report.top_m} neighbour overlap  mean {float(report.overlap.mean()):.4f}",
        f"top-{report.top_m} weighted MSE       mean {float(report.topm_mse.mean()):.4g}",
    ]
    rows = report.worst(worst)
    if rows:
        lines.append(f"worst {len(rows)} facts:")
        lines.append(f"  {'row':>8}  {'A(i)':>12}  {'overlap':>8}  {'top-M MSE':>10}")
        for i in rows:
            lines.append(
                f"  {i:>8}  {report.scores[i]:>12.6g}  {report.overlap[i]:>8.3f}  {report.topm_mse[i]:>10.4g}"
            )
    return "\n".join(lines)


def diagnose(args: argparse.Namespace) -> int:
    keys = _load_matrix(args.keys)
    residuals = _load_matrix(args.residuals)
    with kernel_threads(args.threads):
        report = misalignment(
            keys,
            residuals,
            tau=args.tau,
            top_m=args.top_m,
            progressive=args.progressive,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    widths = (keys.shape[1], residuals.shape[1])
    print(_format_report(report, args.worst, widths))
    if args.json:
        payload: dict[str, Any] = {
            "command": "diagnose",
            "keys": str(args.keys),
            "residuals": str(args.residuals),
            **report.to_dict(worst=args.worst),
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    return 0


def _edit_config(args: argparse.Namespace, model: Any) -> Any:
    from eamet.base.settings import EditConfig

    if args.config:
        config = EditConfig.from_json(args.config)
    elif args.preset:
        config = EditConfig.preset(args.preset, method=args.method)
    else:
        from eamet.models import config_for

        config = config_for(model, args.method, name=args.model)  # a known model's preset, else for_model
    if args.layers is not None:
        config = config.on_layers(args.layers)
    changes: dict[str, Any] = {}
    if args.samples is not None:
        changes["mom2_n_samples"] = args.samples
    if getattr(args, "mom2_update_weight", None) is not None:
        changes["mom2_update_weight"] = args.mom2_update_weight  # one λ, or one per block
    if getattr(args, "align_below_nll", None) is not None:
        gate = args.align_below_nll
        changes["align_below_nll"] = None if gate == "off" else gate
    if args.seed is not None:
        changes["seed"] = args.seed
    changes.update(_speed_changes(args))
    return config.replace(**changes) if changes else config


def _speed_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The residual-step settings given on the command line (``--fact-batch``, ``--z-dtype``)."""
    changes: dict[str, Any] = {}
    if args.fact_batch is not None:
        changes["fact_batch"] = args.fact_batch
    if args.z_dtype is not None:
        changes["z_dtype"] = args.z_dtype
    return changes


def _solve_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the solve given on the command line, for a re-solve (``--from``, ``eval --edit``)."""
    names = {"layers": "layers", "samples": "mom2_n_samples", "mom2_update_weight": "mom2_update_weight"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg, None) is not None}


def _misalignment_text(total: float | None) -> str:
    return "— (fewer than 2 facts or a zero residual)" if total is None else f"{total:.4g}"


def _refuse_with_an_edit(args: argparse.Namespace, names: Sequence[str], why: str) -> None:
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) not in (None, False)]
    if given:
        raise EametError(f"{', '.join(given)} {why}")


def edit(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        # The command prints which facts did not land itself (outcome_line), once.
        warnings.simplefilter("ignore", NotLandedWarning)
        return _edit_command(args)


def _edit_command(args: argparse.Namespace) -> int:
    from eamet.app.loading import load_model
    from eamet.base.facts import load_facts

    if args.source is not None:
        _refuse_with_an_edit(
            args,
            ("preset", "config", "method", "seed", "fact_batch", "z_dtype", "residual_store"),
            "would change the residuals; a re-solve (--from) keeps the edit's own (change only --layers, "
            "--corpus, --samples, --mom2-update-weight)",
        )
        from eamet.edit.results import EditResult

        source = EditResult.load(args.source)  # before the (slow) model load: a bad file fails fast
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        from eamet.edit.editor import Editor

        editor = Editor(model, tokenizer, config=source.config, corpus=args.corpus, cache_dir=args.cache_dir)
        result = editor.resolve(source, progress=not args.no_progress, **_solve_changes(args))
        config = result.config
        print(
            f"re-solved {len(result.facts)} facts of {args.source} at layers {list(config.layers)}, λ "
            f"{', '.join(f'{lam:g}' for lam in config.mom2_update_weight)} (residuals reused)"
        )
    else:
        method = args.method or METHODS[0]
        facts = load_facts(args.facts)  # before torch and the (slow) model load: bad facts fail fast
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        from eamet.edit.editor import Editor

        config = _edit_config(argparse.Namespace(**{**vars(args), "method": method}), model)
        editor = Editor(model, tokenizer, config=config, corpus=args.corpus, cache_dir=args.cache_dir)
        result = editor.edit(facts, residual_store=args.residual_store, progress=not args.no_progress)
        summary = result.summary()
        reused = sum(s.reused for s in result.stats)
        print(
            f"edited {summary['facts']} facts with {config.method} at layers {list(config.layers)}: mean NLL "
            f"{summary['mean']['nll']:.4f}, residual step {summary['residual_seconds']:.1f} s"
            + (f" ({reused} residuals from the store)" if reused else "")
            + f", misalignment total {_misalignment_text(summary['misalignment_total'])}"
        )
    print(result.outcome_line())
    result.save(args.out)
    print(f"wrote {args.out}")
    if args.json:
        per_fact = [
            {"index": i, **fact.to_dict(), **outcome.to_dict()}
            for i, (fact, outcome) in enumerate(zip(result.facts, result.outcomes, strict=True))
        ]
        payload = {"command": "edit", "out": str(args.out), **result.summary(), "per_fact": per_fact}
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    missed = result.not_landed()
    if args.strict and missed:
        print(f"eamet: {len(missed)} of {len(result.facts)} facts did not land (--strict)", file=sys.stderr)
        return 3
    return 0


def stats(args: argparse.Namespace) -> int:
    from eamet.app.loading import load_model
    from eamet.edit.moment_collector import SecondMomentCollector, default_cache_dir
    from eamet.model.parts import ModelParts
    from eamet.model.tokens import TokenAdapter

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    parts = ModelParts(model)
    out = Path(args.out) if args.out else default_cache_dir()
    collector = SecondMomentCollector(
        model,
        parts,
        TokenAdapter(tokenizer, args.bos),
        corpus=args.corpus,
        n_samples=args.samples,
        max_length=args.max_length,
        dtype=args.stats_dtype,
        cache_dir=out,
        progress=not args.no_progress,
    )
    rows = []
    for layer, acc in collector.moments(args.layers).items():
        path = collector.cache_path(acc.metadata)
        print(f"layer {layer}: {acc.dim}x{acc.dim} from {acc.count} tokens -> {path}")
        rows.append({"layer": layer, "dim": acc.dim, "tokens": acc.count, "path": str(path)})
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "stats", "layers": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


def capacity(args: argparse.Namespace) -> int:
    from eamet.app.loading import load_model
    from eamet.base.facts import load_facts
    from eamet.edit.editor import Editor

    facts = load_facts(args.facts)  # before the (slow) model load: bad facts fail fast
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    config = _edit_config(args, model)  # --mom2-update-weight included: one λ, or one per block
    editor = Editor(model, tokenizer, config=config, corpus=args.corpus, cache_dir=args.cache_dir)
    report = editor.capacity(facts, progress=not args.no_progress)
    print(report.table())
    payload: dict[str, Any] = {"command": "capacity", "model": args.model, **report.to_dict()}
    if args.lambda_for is not None:
        suggested = report.lambda_for(args.lambda_for)
        shown = ", ".join(
            f"block {b.layer}: {lam:.6g}" for b, lam in zip(report.blocks, suggested, strict=True)
        )
        print(f"largest λ keeping the mean leverage >= {args.lambda_for:g} (eamet's own rule): {shown}")
        at = report.at(suggested)
        print(at.table())
        payload["lambda_for"] = {
            "target": args.lambda_for,
            "lambdas": list(suggested),
            "report": at.to_dict(),
        }
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    return 0


def _print_run(run: dict[str, Any], json_path: str | None) -> None:
    from eamet.app.report import format_table, write_json

    print(format_table(run))
    if json_path:
        write_json(run, json_path)
        print(f"wrote {json_path}")


def demo(args: argparse.Namespace) -> int:
    from eamet.app.demo import run_demo

    if args.records is not None and args.data is None and args.model == "pocket":
        raise EametError("--records needs --data")
    run = run_demo(
        model=args.model,
        corpus=args.corpus,
        edits=args.edits,
        methods=args.methods,
        data=args.data,
        records=args.records,
        quick=args.quick,
        seed=args.seed,
        prefix_len=args.prefix_len,
        arch=args.arch,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        overrides=_speed_changes(args),
    )
    _print_run(run, args.json)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from eamet.app.loading import load_model
    from eamet.app.protocol import compare_edits, run_edits
    from eamet.base.records import load_dataset

    cases = load_dataset(args.format, args.data, limit=args.n)  # before the (slow) model load
    if args.edit:
        from eamet.edit.editor import EditResult

        _refuse_with_an_edit(
            args,
            ("preset", "config", "fact_batch", "z_dtype"),
            "only apply with --method (the edit's residuals are made; --layers, --corpus, --samples and "
            "--mom2-update-weight re-solve it)",
        )
        edit = EditResult.load(args.edit)
        made = {(f.prompt, f.subject.strip(), f.target.strip()) for f in edit.facts}
        missing = [
            i
            for i, c in enumerate(cases)
            if (c.rewrite.prompt, c.rewrite.subject.strip(), c.rewrite.target.strip()) not in made
        ]
        if missing:
            raise EametError(
                f"{len(missing)} of {len(cases)} records (first: record {missing[0]}) are not facts of "
                f"{args.edit}; evaluate the records the edit was made from (--n to select the first N)"
            )
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    common: dict[str, Any] = {
        "prefix_len": args.prefix_len,
        "seed": args.seed,
        "fluency": True,
        "progress": not args.no_progress,
        "log": print,
        "extra_config": {"model": args.model, "data": args.data, "format": args.format},
    }
    if args.edit:
        # The edit was made elsewhere: its misalignment is in the file, its time is not.
        common["extra_config"]["edit"] = args.edit
        changes = _solve_changes(args)
        if changes or args.corpus is not None:
            from eamet.edit.editor import Editor

            editor = Editor(model, tokenizer, config=edit.config, corpus=args.corpus)
            common["extra_config"]["resolved"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()
            }

            def apply() -> tuple[Any, float]:
                start = time.perf_counter()
                resolved = editor.resolve(edit, progress=not args.no_progress, **changes)
                return resolved, time.perf_counter() - start

            run = compare_edits(model, tokenizer, cases, [(edit.config.method, apply)], **common)
        else:
            run = compare_edits(
                model, tokenizer, cases, [(edit.config.method, lambda: (edit.apply(model), None))], **common
            )
    else:
        run = run_edits(
            model,
            tokenizer,
            cases,
            methods=args.method or (),
            config_for=lambda m, method: _edit_config(
                argparse.Namespace(**{**vars(args), "method": method}), m
            ).replace(method=method),  # a --config file's own method must not win over --method
            corpus=args.corpus,
            **common,
        )
    _print_run(run, args.json)
    return 0


def trace(args: argparse.Namespace) -> int:
    from eamet.app.loading import load_model
    from eamet.base.records import dataset_kind, load_dataset
    from eamet.measure.known import known_cases
    from eamet.measure.tracing import trace

    # Before the (slow) model load: a bad file fails fast. With --known-only, --n counts known records.
    kind = args.format or dataset_kind(args.data)
    cases = load_dataset(kind, args.data, limit=None if args.known_only else args.n)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.known_only:
        read = len(cases)
        cases = known_cases(model, tokenizer, cases, limit=args.n)
        if not cases:
            raise EametError(f"the model knows none of the {read} records of {args.data} (--known-only)")
        print(f"{len(cases)} known records (the true object is the greedy continuation) of {read} read")
    report = trace(
        model,
        tokenizer,
        cases,
        kinds=args.kind,
        window=args.window,
        samples=args.samples,
        noise=args.noise,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(report.table())
    if args.json:
        payload = {"command": "trace", "model": args.model, "data": args.data, **report.to_dict()}
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    return 0
