"""The ``eamet`` command line.

Every command has ``--help``; failures print one line, ``eamet: error: ...``, to stderr and exit 1
(2 for usage errors, as argparse does; ``eamet edit --strict`` exits 3 when a fact did not land).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np

from eamet import _core
from eamet.choices import BosPolicy, PocketArch, ZDtype
from eamet.config import METHODS
from eamet.diagnostics import DEFAULT_TAU, DEFAULT_TOP_M, MisalignmentReport, kernel_threads, misalignment
from eamet.errors import EametError, NotLandedWarning
from eamet.records import DATASET_KINDS

__all__ = ["main"]


def _load_matrix(path: str) -> np.ndarray:
    # Memory-mapped: the core reads float32/float64 files in place, so only its normalised copy is made.
    loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise EametError(f"{path}: expected a .npy file holding one array, got an .npz archive", path=path)
    return np.asarray(loaded)


def _number(text: str, kind: type[int] | type[float]) -> Any:
    # argparse would name the converter in its message ("invalid _positive_int value"): say what is wanted.
    try:
        return kind(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value: int = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value: int = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value: float = _number(text, float)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _gate_threshold(text: str) -> float | str:
    # "off" stays a string here: _edit_config turns it into None (the reference loss).
    return "off" if text.strip().lower() in ("off", "none") else _positive_float(text)


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


def _cmd_diagnose(args: argparse.Namespace) -> int:
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


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative block indices, got {text!r}")
    return layers


def _lambdas(text: str) -> tuple[float, ...]:
    """Comma-separated λ (``mom2_update_weight``): one for every block, or one per block."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected finite λ >= 0, got {text!r}")
    return values


def _edit_config(args: argparse.Namespace, model: Any) -> Any:
    from eamet.config import EditConfig

    if args.config:
        config = EditConfig.from_json(args.config)
    elif args.preset:
        config = EditConfig.preset(args.preset, method=args.method)
    else:
        from eamet.runs import model_config

        config = model_config(args.model, model, args.method)  # a known model's preset, else for_model
    changes: dict[str, Any] = {}
    if args.layers is not None:
        changes["layers"] = args.layers
        if len(config.mom2_update_weight) != len(args.layers):
            changes["mom2_update_weight"] = (config.mom2_update_weight[-1],) * len(args.layers)
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


def _align_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--align-below-nll",
        type=_gate_threshold,
        metavar="T|off",
        help="EAMET: count the alignment terms for a fact only while its NLL is below T (eamet's own "
        "extension, docs/editing.md); 'off' is the paper's loss (default: from the config; the "
        "smollm2-135m preset gates at 0.1)",
    )


def _speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fact-batch",
        type=_positive_int,
        help="facts optimised together in the residual step (default: from the config, 1 = serial)",
    )
    parser.add_argument(
        "--z-dtype",
        choices=get_args(ZDtype),
        help="compute dtype of the residual step (default: from the config, 'auto')",
    )


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


def _cmd_edit(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        # The command prints which facts did not land itself (outcome_line), once.
        warnings.simplefilter("ignore", NotLandedWarning)
        return _edit_command(args)


def _edit_command(args: argparse.Namespace) -> int:
    from eamet.loading import load_facts, load_model

    if args.source is not None:
        _refuse_with_an_edit(
            args,
            ("preset", "config", "method", "seed", "fact_batch", "z_dtype", "residual_store"),
            "would change the residuals; a re-solve (--from) keeps the edit's own (change only --layers, "
            "--corpus, --samples, --mom2-update-weight)",
        )
        from eamet.results import EditResult

        source = EditResult.load(args.source)  # before the (slow) model load: a bad file fails fast
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        from eamet.editor import Editor

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
        from eamet.editor import Editor

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


def _cmd_stats(args: argparse.Namespace) -> int:
    from eamet.covariance import CovarianceCollector, default_cache_dir
    from eamet.loading import load_model
    from eamet.parts import ModelParts
    from eamet.tokens import TokenAdapter

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    parts = ModelParts(model)
    out = Path(args.out) if args.out else default_cache_dir()
    collector = CovarianceCollector(
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


def _open_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _cmd_capacity(args: argparse.Namespace) -> int:
    from eamet.editor import Editor
    from eamet.loading import load_facts, load_model

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


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(METHODS)}; got {text!r}"
        )
    return methods


def _print_run(run: dict[str, Any], json_path: str | None) -> None:
    from eamet.runs import format_table, write_json

    print(format_table(run))
    if json_path:
        write_json(run, json_path)
        print(f"wrote {json_path}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from eamet.runs import run_demo

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


def _cmd_eval(args: argparse.Namespace) -> int:
    from eamet.loading import load_model
    from eamet.records import load_dataset
    from eamet.runs import compare_edits, run_edits

    cases = load_dataset(args.format, args.data, limit=args.n)  # before the (slow) model load
    if args.edit:
        from eamet.editor import EditResult

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
            from eamet.editor import Editor

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


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in ("block", "mlp") for k in kinds):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of block, mlp; got {text!r}")
    return kinds


def _cmd_trace(args: argparse.Namespace) -> int:
    from eamet.evaluation import known_cases
    from eamet.loading import load_model
    from eamet.records import dataset_kind, load_dataset
    from eamet.tracing import trace

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


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="hub id or local directory of a causal LM, or a model eamet knows (smollm2-135m: see "
        "docs/models.md)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights' dtype"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="PATH", help="also write a JSON summary")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``eamet`` command."""
    parser = argparse.ArgumentParser(
        prog="eamet",
        description="Massive knowledge editing of Hugging Face causal LMs (EAMET, MEMIT) and diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"eamet {_core.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    diagnose = commands.add_parser(
        "diagnose",
        help="score the embedding misalignment of keys vs residuals (.npy files)",
        description=(
            "Per-fact misalignment A(i) = KL(P_r(i) || P_k(i)) of residual vs key cosine "
            "neighbourhoods, with top-M overlap and weighted MSE. Row i of both files is fact i."
        ),
    )
    diagnose.add_argument("keys", help="(N, d_k) float array in .npy format")
    diagnose.add_argument("residuals", help="(N, d_r) float array in .npy format")
    diagnose.add_argument(
        "--tau", type=_positive_float, default=DEFAULT_TAU, help="softmax temperature (default %(default)s)"
    )
    diagnose.add_argument(
        "--top-m", type=_positive_int, default=DEFAULT_TOP_M, help="neighbours per fact (default %(default)s)"
    )
    diagnose.add_argument(
        "--progressive",
        action="store_true",
        help="support j < i (EAMET's optimisation order) instead of j != i",
    )
    diagnose.add_argument(
        "--worst", type=_non_negative_int, default=10, help="worst facts to list (default %(default)s)"
    )
    diagnose.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    diagnose.add_argument("--plot", metavar="OUT.png", help="also draw the report (needs eamet[plot])")
    diagnose.add_argument(
        "--threads", type=_positive_int, help="kernel threads (default: EAMET_NUM_THREADS or all CPUs)"
    )
    diagnose.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (shown only on a terminal)"
    )
    diagnose.set_defaults(run=_cmd_diagnose)

    edit = commands.add_parser(
        "edit",
        help="edit facts (JSONL) into a model; writes the edit as a .safetensors file",
        description=(
            "Edits every fact of FACTS.jsonl (records {prompt, subject, target} or the ROME/CounterFact "
            "request format) into the model and saves the edit (apply it with "
            "eamet.EditResult.load(path).apply(model)). The model files are not modified."
        ),
    )
    _model_options(edit)
    what = edit.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--facts",
        help='facts, one JSON record per line (or a .json list): {"prompt": "The capital of {} is", '
        '"subject": "France", "target": "Lyon"} (no leading space needed), or CounterFact/ROME/EasyEdit '
        "records (docs/editing.md, 'Facts and their files')",
    )
    what.add_argument(
        "--from",
        dest="source",
        metavar="EDIT.safetensors",
        help="re-solve a saved edit with other solve settings (--mom2-update-weight, --layers ending at "
        "the same block, --corpus, --samples), reusing its residuals: seconds instead of the residual step",
    )
    edit.add_argument("--out", required=True, help="where to write the edit (.safetensors)")
    edit.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 3 if any fact did not land (the edit is still written)",
    )
    edit.add_argument("--method", choices=METHODS, help=f"(default {METHODS[0]})")
    choice = edit.add_mutually_exclusive_group()
    choice.add_argument("--preset", help="a model's preset, e.g. llama2-7b (reference) or smollm2-135m")
    choice.add_argument("--config", metavar="JSON", help="EditConfig JSON or a reference hparams file")
    edit.add_argument("--layers", type=_layers, help="edited blocks, e.g. 3,4 (default: from the config)")
    edit.add_argument(
        "--corpus", help="text for C = E[kkᵀ]: .txt/.jsonl path, hf:<dataset>[:<config>], or model:<n>"
    )
    edit.add_argument(
        "--samples", type=_positive_int, help="corpus documents for C (default: from the config)"
    )
    edit.add_argument(
        "--mom2-update-weight",
        type=_lambdas,
        metavar="L[,L]",
        help="λ of the solve: one for every block or one per block (default: from the config)",
    )
    edit.add_argument("--cache-dir", help="statistics cache (default ~/.cache/eamet/stats)")
    edit.add_argument(
        "--residual-store",
        "--checkpoint-dir",
        metavar="DIR",
        help="keep every fact's residual here: a rerun resumes, and later edits with another λ, other "
        "blocks ending at the same one, or a prefix of the facts reuse them (--checkpoint-dir: older name)",
    )
    edit.add_argument("--seed", type=int, help="seed of the context templates (default: from the config)")
    _align_option(edit)
    _speed_options(edit)
    edit.set_defaults(run=_cmd_edit)

    stats = commands.add_parser(
        "stats",
        help="collect C = E[kkᵀ] of the edited layers' MLP inputs over a corpus (cached)",
        description="Collects the covariance statistics an edit needs, ahead of time, into the cache.",
    )
    _model_options(stats)
    stats.add_argument("--layers", type=_layers, required=True, help="blocks, e.g. 3,4")
    stats.add_argument(
        "--corpus", required=True, help=".txt (one document per line), .jsonl, hf:<dataset>, or model:<n>"
    )
    stats.add_argument(
        "--samples", type=_positive_int, default=100_000, help="documents (default %(default)s)"
    )
    stats.add_argument("--max-length", type=_positive_int, default=1024, help="tokens per document")
    stats.add_argument(
        "--stats-dtype", choices=("float32", "float64"), default="float32", help="product precision"
    )
    stats.add_argument("--bos", choices=get_args(BosPolicy), default="native", help="BOS policy")
    stats.add_argument("--out", help="cache directory (default ~/.cache/eamet/stats)")
    stats.set_defaults(run=_cmd_stats)

    capacity = commands.add_parser(
        "capacity",
        help="forecast how much of each fact's residual the update can realise (leverage), before editing",
        description=(
            "From the keys (one forward per fact and block) and C alone, per edited block: each fact's "
            "leverage h_i = k_i'(λC + K'K)^-1 k_i (the share of a lone residual the solve realises), "
            "tr(H) against N, and the cosines to each fact's top-M key neighbours. No weight changes."
        ),
    )
    _model_options(capacity)
    capacity.add_argument("--facts", required=True, help="facts, one JSON record per line (or a .json list)")
    capacity.add_argument("--method", choices=METHODS, default=METHODS[0], help="(default %(default)s)")
    choice = capacity.add_mutually_exclusive_group()
    choice.add_argument("--preset", help="a model's preset, e.g. llama2-7b (reference) or smollm2-135m")
    choice.add_argument("--config", metavar="JSON", help="EditConfig JSON or a reference hparams file")
    capacity.add_argument("--layers", type=_layers, help="edited blocks, e.g. 3,4 (default: from the config)")
    capacity.add_argument(
        "--corpus", help="text for C = E[kkᵀ]: .txt/.jsonl path, hf:<dataset>[:<config>], or model:<n>"
    )
    capacity.add_argument(
        "--samples", type=_positive_int, help="corpus documents for C (default: from the config)"
    )
    capacity.add_argument(
        "--mom2-update-weight",
        type=_lambdas,
        metavar="L[,L]",
        help="λ: one for every block or one per block (default: from the config)",
    )
    capacity.add_argument(
        "--lambda-for",
        type=_open_fraction,
        metavar="TARGET",
        help="also print, per block, the largest λ keeping the mean leverage >= TARGET (eamet's own rule), "
        "and the report at that λ",
    )
    capacity.add_argument("--plot", metavar="OUT.png", help="also draw the report (needs eamet[plot])")
    capacity.add_argument("--cache-dir", help="statistics cache (default ~/.cache/eamet/stats)")
    capacity.add_argument("--seed", type=int, help="seed of the context templates (default: from the config)")
    capacity.set_defaults(run=_cmd_capacity, fact_batch=None, z_dtype=None)  # _edit_config reads them

    demo = commands.add_parser(
        "demo",
        help="edit the sandbox's pocket model with EAMET and MEMIT and compare, before and after",
        description=(
            "Loads the pocket model of the default sandbox world (shipped with the package) or trains "
            "one on a CounterFact file (--data), evaluates it, edits N facts with each method from the "
            "same unedited weights, evaluates again and prints strict and lenient metrics side by side."
        ),
    )
    demo.add_argument(
        "--model",
        default="pocket",
        help="pocket (the sandbox's model, shipped), a known model (smollm2), or a directory / hub id "
        "(default %(default)s)",
    )
    demo.add_argument(
        "--edits",
        type=_positive_int,
        help="facts to edit (pocket: default 256, --quick 32; a real model: 32)",
    )
    demo.add_argument(
        "--methods", type=_methods, default=METHODS, help=f"comma-separated (default {','.join(METHODS)})"
    )
    demo.add_argument(
        "--data",
        help="a CounterFact JSON file (ROME or EasyEdit form): pocket builds its world from it, a real "
        "model edits its cases (default for smollm2: shipped cases it knows)",
    )
    demo.add_argument("--corpus", help="a real model's text for C: cases (default), model:<n>, .txt/.jsonl")
    demo.add_argument("--records", type=_positive_int, help="use the first N records of --data")
    demo.add_argument("--quick", action="store_true", help="edit 32 facts, skip fluency: under a minute")
    demo.add_argument("--seed", type=int, default=0, help="seed of prefixes and templates (default 0)")
    demo.add_argument(
        "--prefix-len", type=_non_negative_int, default=0, help="evaluation prefix tokens (default 0)"
    )
    demo.add_argument(
        "--arch", choices=get_args(PocketArch), default="llama", help="pocket model (default %(default)s)"
    )
    demo.add_argument(
        "--cache-dir", help="where trained pocket models are cached (default ~/.cache/eamet/pocket)"
    )
    _speed_options(demo)
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_cmd_demo)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a model on CounterFact or zsRE, before and after an edit",
        description=(
            "Evaluates the model on the data file (strict and lenient efficacy, generalisation, "
            "specificity; fluency), then after applying a saved edit (--edit) or after editing the "
            "file's first N records with each --method, each from the unedited weights."
        ),
    )
    _model_options(evaluate)
    evaluate.add_argument("--data", required=True, help="the dataset file")
    evaluate.add_argument("--format", choices=DATASET_KINDS, required=True)
    how = evaluate.add_mutually_exclusive_group(required=True)
    how.add_argument("--edit", metavar="EDIT.safetensors", help="a saved edit to apply (eamet edit --out)")
    how.add_argument("--method", type=_methods, help="edit the records first: eamet, memit or eamet,memit")
    evaluate.add_argument("--n", type=_positive_int, help="use the first N records (default all)")
    evaluate.add_argument(
        "--prefix-len", type=_non_negative_int, default=5, help="evaluation prefix tokens (default 5)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of prefixes and templates (default 0)")
    choice = evaluate.add_mutually_exclusive_group()
    choice.add_argument("--preset", help="a model's preset, e.g. llama2-7b (reference) or smollm2-135m")
    choice.add_argument("--config", metavar="JSON", help="EditConfig JSON or a reference hparams file")
    evaluate.add_argument("--layers", type=_layers, help="edited blocks (default: from the config)")
    evaluate.add_argument(
        "--corpus",
        help="text for C = E[kkᵀ]: .txt/.jsonl path, hf:<dataset> or model:<n> (text the model samples)",
    )
    evaluate.add_argument("--samples", type=_positive_int, help="corpus documents for C")
    evaluate.add_argument(
        "--mom2-update-weight",
        type=_lambdas,
        metavar="L[,L]",
        help="λ of the solve, one or one per block; with --edit, re-solves the saved edit (seconds)",
    )
    _align_option(evaluate)
    _speed_options(evaluate)
    evaluate.set_defaults(run=_cmd_eval)
    tracing = commands.add_parser(
        "trace",
        help="causal tracing (ROME): which blocks carry known facts at the subject's last token",
        description=(
            "Runs each record's prompt clean, with Gaussian noise on the subject's input embeddings, and "
            "corrupted with one clean state restored at the subject's last token (a block's output, or the "
            "MLP outputs of a window of blocks); prints P(true object) and the indirect effect per block."
        ),
    )
    _model_options(tracing)
    tracing.add_argument("--data", required=True, help="the dataset file (records need a true object)")
    tracing.add_argument(
        "--format",
        choices=("counterfact", "zsre", "jsonl"),
        help="the file's format (default: jsonl for a .jsonl file, else counterfact)",
    )
    tracing.add_argument(
        "--n", type=_positive_int, help="trace the first N records (known records with --known-only)"
    )
    tracing.add_argument(
        "--known-only", action="store_true", help="keep the records whose true object the model gives"
    )
    tracing.add_argument(
        "--kind", type=_kinds, default=("block", "mlp"), help="states to restore (default block,mlp)"
    )
    tracing.add_argument(
        "--window", type=_positive_int, default=10, help="MLP outputs restored per run (default 10, ROME)"
    )
    tracing.add_argument(
        "--samples", type=_positive_int, default=10, help="noise samples per record (default 10)"
    )
    tracing.add_argument(
        "--noise", type=_positive_float, help="noise std ν (default 3 × std of the subjects' embeddings)"
    )
    tracing.add_argument("--seed", type=_non_negative_int, default=0, help="noise seed (default 0)")
    tracing.add_argument("--batch-size", type=_positive_int, default=64, help="rows per forward (default 64)")
    tracing.add_argument("--plot", metavar="OUT.png", help="also draw the trace (needs eamet[plot])")
    tracing.set_defaults(run=_cmd_trace)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eamet`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("eamet: interrupted", file=sys.stderr)
        return 130
    except (EametError, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"eamet: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
