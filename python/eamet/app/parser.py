"""The ``eamet`` command line's parser: subcommands, their options and the argument types that check them."""

from __future__ import annotations

import argparse
from typing import Any, get_args

from eamet import kernels
from eamet.app import commands as cmd
from eamet.base.choices import DTYPES, BosPolicy, PocketArch, StatsDType, TraceKind, ZDtype
from eamet.base.records import DATASET_KINDS
from eamet.base.settings import METHODS
from eamet.kernels.diagnostics import (
    DEFAULT_TAU,
    DEFAULT_TOP_M,
)

__all__ = ["build_parser"]


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


def _open_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(METHODS)}; got {text!r}"
        )
    return methods


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    allowed = get_args(TraceKind)
    if not kinds or any(k not in allowed for k in kinds):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(allowed)}; got {text!r}"
        )
    return kinds


def _settings_options(parser: argparse.ArgumentParser) -> None:
    """The edit's settings, as ``edit`` and ``capacity`` take them: a preset or a config file, then the
    solve's settings over it."""
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--preset", help="a model's preset, e.g. llama2-7b (reference) or smollm2-135m")
    choice.add_argument("--config", metavar="JSON", help="EditConfig JSON or a reference hparams file")
    parser.add_argument(
        "--layers",
        type=_layers,
        help="edited blocks, e.g. 3,4 (default: from the config; a block keeps its λ, a new one takes the "
        "last block's)",
    )
    parser.add_argument(
        "--corpus", help="text for C = E[kkᵀ]: .txt/.jsonl path, hf:<dataset>[:<config>], or model:<n>"
    )
    parser.add_argument(
        "--samples", type=_positive_int, help="corpus documents for C (default: from the config)"
    )
    parser.add_argument(
        "--mom2-update-weight",
        type=_lambdas,
        metavar="L[,L]",
        help="λ of the solve: one for every block or one per block (default: from the config)",
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="hub id or local directory of a causal LM, or a model eamet knows (smollm2-135m: see "
        "docs/models.md)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="PATH", help="also write a JSON summary")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``eamet`` command."""
    parser = argparse.ArgumentParser(
        prog="eamet",
        description="Massive knowledge editing of Hugging Face causal LMs (EAMET, MEMIT) and diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"eamet {kernels.__version__}")
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
    diagnose.set_defaults(run=cmd.diagnose)

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
    _settings_options(edit)
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
    edit.set_defaults(run=cmd.edit)

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
        "--stats-dtype", choices=get_args(StatsDType), default="float32", help="product precision"
    )
    stats.add_argument("--bos", choices=get_args(BosPolicy), default="native", help="BOS policy")
    stats.add_argument("--out", help="cache directory (default ~/.cache/eamet/stats)")
    stats.set_defaults(run=cmd.stats)

    capacity = commands.add_parser(
        "capacity",
        help="forecast how much of each fact's residual the update can realise (leverage), before editing",
        description=(
            "From the keys (one forward per fact for every block) and C alone, per edited block: each fact's "
            "leverage h_i = k_i'(λC + K'K)^-1 k_i (the share of a lone residual the solve realises), "
            "tr(H) against N, and the cosines to each fact's top-M key neighbours. No weight changes."
        ),
    )
    _model_options(capacity)
    capacity.add_argument("--facts", required=True, help="facts, one JSON record per line (or a .json list)")
    capacity.add_argument("--method", choices=METHODS, default=METHODS[0], help="(default %(default)s)")
    _settings_options(capacity)
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
    capacity.set_defaults(run=cmd.capacity, fact_batch=None, z_dtype=None)  # _edit_config reads them

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
    demo.set_defaults(run=cmd.demo)

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
    evaluate.set_defaults(run=cmd.evaluate)
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
        choices=DATASET_KINDS,
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
    tracing.set_defaults(run=cmd.trace)
    return parser
