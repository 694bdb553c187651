"""EAMET against MEMIT on a real model as N grows: the paper's experiment, at the scale a machine allows.

    python benches/bench_real.py --model smollm2 --data COUNTERFACT.json --known-only \\
        --edits 64,256,1024 --prefix-lens 0,5,50 --json real.json --plot real.png
    python benches/bench_real.py --model smollm2 --edits 32 --prefix-lens 0,5 \\
        --variant memit=memit:fact_batch=16 --variant eamet --variant eamet-gated=eamet:align_below_nll=0.1
    python benches/bench_real.py --model smollm2 --data ... --device cuda --edits 1000,2000,5000,10000

For each N, each variant edits the first N cases (of the file, or of those the model knows with
``--known-only``) into the same unedited model, is evaluated with every prefix length — prefixes generated
once per length from the unedited model — and undone. A variant is ``NAME=METHOD[:key=value,...]``
(``EditConfig`` settings over the model's own — its preset, else ``for_model``; ``a;b`` is a tuple;
``--set key=value`` applies to all; a bare method name is that method's settings for the model). Per row:
strict and lenient efficacy / generalisation / specificity, fluency (``--fluency``), the misalignment total,
the edit's seconds and seconds per fact in the residual step, peak memory (RSS; on CUDA the device's peak
allocation), the mean final loss terms, and — without ``--known-only`` — the same rates over the cases the
model knew before editing (``known_*``). ``--eval-cases K`` evaluates the first K edited cases, or with
``--eval-spread`` K cases spread evenly over the N. Each edited row also keeps, per evaluated case, what
could predict its failure beside whether it failed (``per_case``: strict efficacy, the fact's misalignment
score, each block's leverage and fit error, the residual step's NLL; ``benches/verdict/figures.py
--predictors`` reads them). ``--merge`` adds earlier ``--json`` outputs, so a long sweep can run in
pieces; the ``--json`` file is rewritten after every row, so a run that is cut keeps the rows it finished.

``--sharing-subjects K`` keeps the cases whose subject has at least K cases in the data (the paper's several
facts about one subject), grouped by subject.

Models: ``pocket`` (the sandbox's shipped model and world; ``--data`` not used), a known name of
``eamet.models`` (``smollm2``), or a local directory / hub id. Corpus for C (``--corpus``): ``model:<n>``
(text sampled from the model), ``cases`` (the texts of the records after the edited ones), or a file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import peak_rss_mib, reset_peak_rss
from eamet.app.demo import CASES_CORPUS_DOCUMENTS
from eamet.base.files import atomic_write, cache_dir
from eamet.base.metrics import RATE_KEYS
from eamet.base.records import cases_sharing_subjects, cases_texts
from eamet.base.settings import METHODS, EditConfig
from eamet.edit.editor import Editor
from eamet.measure.evaluation import evaluate
from eamet.measure.generation import evaluation_prefixes
from eamet.measure.known import known_cases
from eamet.model.tokens import TokenAdapter
from eamet.models import config_for
from sweeps import check_idle, format_row, header, merged, plot

EXTRA = ("fluency", "known_efficacy_strict", "s_per_fact", "peak_mib", "mean_nll", "eval_seconds")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def value(text: str) -> Any:
    """A setting's value: JSON, ``a;b;c`` for a tuple (``layers=3;4;5``), else the text itself."""
    if ";" in text:
        return tuple(value(part) for part in text.split(";") if part)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def settings(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        out[key.strip()] = value(raw.strip())
    return out


def variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"name=method:key=value,key=value"`` (or ``"method"``) -> (name, method, overrides)."""
    name, _, spec = text.partition("=")
    spec = spec or name
    method, _, rest = spec.partition(":")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"variant {text!r}: method must be one of {', '.join(METHODS)}")
    return name, method, settings(rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="pocket, a known model name, or a path / hub id")
    parser.add_argument(
        "--data",
        help="CounterFact JSON (ROME or EasyEdit form) or cases as JSONL (default: shipped known cases)",
    )
    parser.add_argument("--known-only", action="store_true", help="edit only cases the model knows strictly")
    parser.add_argument(
        "--sharing-subjects",
        type=int,
        metavar="K",
        help="edit only cases whose subject has at least K cases in the data, grouped by subject",
    )
    parser.add_argument("--edits", type=ints, default=[64, 256, 1024])
    parser.add_argument("--prefix-lens", type=ints, default=[0, 5, 50])
    parser.add_argument("--variant", action="append", type=variant, default=[], help="NAME=METHOD[:k=v,...]")
    parser.add_argument("--set", type=settings, default={}, help="k=v,... for every variant")
    parser.add_argument("--corpus", default="model:1000", help="model:<n>, cases, or a .txt/.jsonl file")
    parser.add_argument("--eval-cases", type=int, default=256, help="evaluate at most this many edited cases")
    parser.add_argument(
        "--eval-spread",
        action="store_true",
        help="evaluate --eval-cases cases spread evenly over the N edited (default: the first ones)",
    )
    parser.add_argument("--fluency", action="store_true", help="also measure fluency (slow)")
    parser.add_argument(
        "--residual-store",
        metavar="DIR",
        help="take the residuals found in this store (eamet.edit.store), compute and add the rest",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="the model's weights' dtype")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-busy", action="store_true", help="run even if other work loads the CPUs")
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--plot", help="write a PNG of strict metrics against N")
    parser.add_argument("--merge", action="append", default=[], help="an earlier --json output to include")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = check_idle(args.allow_busy)
    variants = args.variant or [variant(m) for m in METHODS]

    model, tokenizer, cases, corpus_texts, base_config = setup(args)
    known_ids = known_case_ids(model, tokenizer, cases, args)
    if args.known_only:
        cases = [c for c in cases if c.case_id in known_ids]
    looked_up = len(cases) if args.known_only else min(len(cases), max(args.edits))
    n_known = sum(c.case_id in known_ids for c in cases[:looked_up])
    print(f"# {args.model}: {len(cases)} cases, {n_known} known of the first {looked_up}", flush=True)
    corpus: Any = args.corpus
    tokens = TokenAdapter(tokenizer)
    prefixes = {n: evaluation_prefixes(model, tokens, n, seed=0) for n in args.prefix_lens}
    rows: list[dict[str, Any]] = []
    # Rows before editing of earlier outputs (--merge) that evaluated the same cases: not measured again.
    earlier_before = {
        (r["edits"], r["prefix_len"], r.get("evaluated"), r.get("eval_spread"))
        for path in args.merge
        for r in json.loads(Path(path).read_text())["rows"]
        if r["method"] == "before"
    }
    columns = (*header_columns(), *EXTRA)
    print(header(columns), flush=True)
    command = "python " + " ".join(sys.argv)

    def record(row: dict[str, Any]) -> None:
        """Print a row and rewrite the JSON with every row so far, so a cut sweep keeps what it measured."""
        rows.append(row)
        print(format_row(row, columns), flush=True)
        if args.json:
            commands, merged_rows = merged(args.merge, command, rows)
            payload = {"commands": commands, "load_average": load, "rows": merged_rows}
            text = json.dumps(payload, indent=1) + "\n"
            atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))

    for n_edits in args.edits:
        if n_edits > len(cases):
            print(f"# skipping N = {n_edits}: only {len(cases)} cases", flush=True)
            continue
        edited = cases[:n_edits]
        picked = (
            spread(n_edits, args.eval_cases) if args.eval_spread else range(min(n_edits, args.eval_cases))
        )
        evaluated = [edited[i] for i in picked]
        if args.corpus == "cases":
            corpus = corpus_texts(n_edits)
        # Which cases were evaluated: how many, and whether spread over the N (moot when all were).
        sample = {"evaluated": len(evaluated), "eval_spread": args.eval_spread and len(evaluated) < n_edits}
        for length, pre in prefixes.items():
            if (n_edits, length, *sample.values()) in earlier_before:
                print(f"# N = {n_edits}, prefix {length}: unedited row from the merged output", flush=True)
                continue
            row, _ = measure(model, tokenizer, evaluated, pre, length, known_ids, args, n_edits, "before")
            record({**row, **sample})
        for name, method, overrides in variants:
            config = base_config(model, method)
            if args.corpus == "cases":  # short texts: read as many as the demo does (app/demo.py)
                config = config.replace(mom2_n_samples=CASES_CORPUS_DOCUMENTS)
            config = config.replace(**{**overrides, **args.set})
            editor = Editor(model, tokenizer, config=config, corpus=corpus)
            editor.covariance(progress=False)  # shared by the variants: collected outside the timing
            reset_peak_rss()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            result = editor.edit(
                [c.rewrite for c in edited], residual_store=args.residual_store, progress=False
            )
            try:
                extra = edit_record(result, time.perf_counter() - began, config)
                signals = fact_signals(result, picked)  # the same for every prefix length
                for length, pre in prefixes.items():
                    row, report = measure(
                        model, tokenizer, evaluated, pre, length, known_ids, args, n_edits, name
                    )
                    strict = [r["efficacy_strict"] for r in report.per_record]
                    record({**row, **sample, **extra, "per_case": {**signals, "efficacy_strict": strict}})
            finally:
                result.undo()
    print(f"# {command}\n# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    _, rows = merged(args.merge, command, rows)
    if args.plot:
        plot(rows, args.plot, sorted({r["method"] for r in rows} - {"before"}), title=args.model)


def header_columns() -> tuple[str, ...]:
    return ("edits", "method", "prefix_len", *RATE_KEYS, "misalignment_total", "edit_seconds")


def setup(args: argparse.Namespace) -> tuple[Any, Any, list[Any], Any, Any]:
    """Model, tokenizer, cases, ``corpus_texts(n_edited)`` and ``base_config(model, method)``."""
    if args.model == "pocket":
        from eamet.sandbox.pocket import default_world, edit_config, pocket_model, world_corpus

        world = default_world()
        model, tokenizer = pocket_model(world, progress=False)
        texts = world_corpus(world)
        return model, tokenizer, list(world.cases), lambda _n: texts, edit_config
    from eamet.app.loading import load_model
    from eamet.base.records import dataset_kind, load_dataset

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.data is None:
        import eamet.models

        cases = eamet.models.known_facts(args.model)  # the shipped cases a known model knows
    else:
        cases = load_dataset(dataset_kind(args.data), args.data)

    if args.sharing_subjects is not None:
        # A subject asked the same way twice (CounterFact has a few) is one fact: keep its first case, or
        # the editor refuses the pair as conflicting.
        seen: set[tuple[str, str]] = set()
        distinct = []
        for case in cases:
            key = (case.rewrite.subject.strip(), case.rewrite.prompt)
            if key not in seen:
                seen.add(key)
                distinct.append(case)
        cases = grouped_by_subject(cases_sharing_subjects(distinct, args.sharing_subjects))

    def corpus_texts(n_edits: int) -> list[str]:
        return cases_texts(cases[n_edits:])

    return model, tokenizer, cases, corpus_texts, lambda m, method: config_for(m, method, name=args.model)


def grouped_by_subject(cases: list[Any]) -> list[Any]:
    """``cases`` with the cases of one subject next to each other (subjects in order of first appearance),
    so that the first N edits are groups of facts about the same subject (the last one may be cut)."""
    first: dict[str, int] = {}
    for case in cases:
        first.setdefault(case.rewrite.subject.strip(), len(first))
    return sorted(cases, key=lambda case: first[case.rewrite.subject.strip()])


def spread(n: int, k: int) -> list[int]:
    """At most ``k`` of the indices ``0..n-1``, evenly spaced from the first (all of them when ``k`` ≥ ``n``):
    a fixed-size sample of an edit whose facts were edited in order (EAMET's later facts align against more
    residuals than its first ones)."""
    if k >= n:
        return list(range(n))
    return [(i * n) // k for i in range(k)]


def known_case_ids(model: Any, tokenizer: Any, cases: list[Any], args: argparse.Namespace) -> set[Any]:
    """Ids of the cases whose true object the unedited model gives strictly, cached per model and data."""
    from eamet.model.fingerprint import model_fingerprint
    from eamet.model.parts import ModelParts

    if args.model == "pocket" or args.data is None:  # the pocket world, or cases shipped as known
        return {c.case_id for c in cases}
    if not args.known_only:  # only the edited cases are ever looked up
        cases = cases[: max(args.edits)]
    digest = hashlib.sha256(model_fingerprint(model, ModelParts(model)).encode())
    digest.update(Path(args.data).read_bytes())
    digest.update(json.dumps([c.case_id for c in cases]).encode())
    path = cache_dir("known") / f"{digest.hexdigest()[:24]}.json"
    if path.is_file():
        return set(json.loads(path.read_text())["ids"])
    began = time.perf_counter()
    ids = [c.case_id for c in known_cases(model, tokenizer, cases)]
    print(f"# known cases: {len(ids)} of {len(cases)} ({time.perf_counter() - began:.0f} s)", flush=True)
    text = json.dumps({"model": args.model, "data": str(args.data), "ids": ids})
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return set(ids)


def measure(
    model: Any,
    tokenizer: Any,
    cases: list[Any],
    prefixes: list[str],
    length: int,
    known: set[Any],
    args: argparse.Namespace,
    n_edits: int,
    name: str,
) -> tuple[dict[str, Any], Any]:
    """One row of rates for ``cases`` on the model as it is now, and the evaluation report it came from."""
    began = time.perf_counter()
    report = evaluate(
        model, tokenizer, cases, prefixes=prefixes, prefix_len=length, fluency=args.fluency, progress=False
    )
    row: dict[str, Any] = {"edits": n_edits, "method": name, "prefix_len": length, **report.metrics()}
    row["eval_seconds"] = time.perf_counter() - began
    if not args.known_only:
        rows = [r for r in report.per_record if r["case_id"] in known]
        row["known_cases"] = len(rows)
        for key in RATE_KEYS:
            values = [r[key] for r in rows if r[key] is not None]
            row[f"known_{key}"] = sum(values) / len(values) if values else None
    return row, report


def fact_signals(result: Any, picked: Any, digits: int | None = 4) -> dict[str, Any]:
    """What could predict each picked fact's failure (``picked``: indices in the edit), as a ``per_case``
    record holds it: ``index``, ``misalignment`` (the fact's A(i), None without a report), ``leverage`` and
    ``fit_error`` per block (the solve's share of the residual and how far the update missed it),
    ``residual_nll`` (the residual step's final NLL); values to ``digits`` significant digits (None: as
    they are). ``benches/verdict/figures.py`` reads the same record from edit files."""

    def values_at(values: Any) -> list[float]:
        return [float(f"{float(values[i]):.{digits}g}") if digits else float(values[i]) for i in picked]

    scores = result.misalignment.scores if result.misalignment is not None else None
    return {
        "index": list(picked),
        "misalignment": values_at(scores) if scores is not None else None,
        "leverage": {
            str(u.layer): values_at(u.leverage.double()) for u in result.updates if u.leverage.numel()
        },
        "fit_error": {
            str(u.layer): values_at(u.fit_error.double()) for u in result.updates if u.fit_error.numel()
        },
        "residual_nll": values_at([s.nll for s in result.stats]),
    }


def edit_record(result: Any, seconds: float, config: EditConfig) -> dict[str, Any]:
    """What one edit measured besides the evaluation."""
    stats = result.stats
    n = len(stats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib()
    return {
        "misalignment_total": None if result.misalignment is None else float(result.misalignment.total),
        "edit_seconds": seconds,
        "s_per_fact": sum(s.seconds for s in stats) / n,
        "peak_mib": peak,
        "mean_nll": sum(s.nll for s in stats) / n,
        "mean_alignment_kl": sum(s.alignment_kl for s in stats) / n,
        "mean_topm_mse": sum(s.topm_mse for s in stats) / n,
        "mean_steps": sum(s.steps for s in stats) / n,
        "mean_delta_over_radius": sum(s.delta_norm / s.radius for s in stats) / n,
        "reused_residuals": sum(s.reused for s in stats),
        "mean_leverage": result.summary().get("mean_leverage"),  # the capacity report's prediction
        "landed": sum(o.landed for o in result.outcomes) / n if result.outcomes else None,
        "config": config.to_dict(),
    }


if __name__ == "__main__":
    main()
