"""EAMET vs MEMIT on the sandbox: sweep the number of edits across and beyond the edited layers' d_ff.

    python benches/bench_sandbox_sweep.py [--edits 64,256,1024,4096] [--prefix-lens 0,5,50]
        [--methods eamet,memit] [--data COUNTERFACT.json --records N] [--json OUT.json] [--plot OUT.png]
        [--merge EARLIER.json ...]

For each N, each method edits the first N edit cases into the same unedited pocket model (the shipped
default-world model, or one trained on --data), which is then evaluated with every prefix length —
prefixes generated once per length from the unedited model — and undone. Prints one row per
(N, method, prefix length): strict and lenient efficacy / generalisation / specificity, misalignment total
and edit seconds; the rows before editing come first. ``--merge`` adds the rows of earlier ``--json``
outputs (a row measured now replaces an earlier one with the same N, method and prefix length), so a long
sweep can be run in pieces and written and plotted as one.
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

from eamet.base.records import load_dataset
from eamet.edit.editor import Editor
from eamet.measure.evaluation import evaluate
from eamet.measure.generation import evaluation_prefixes
from eamet.model.tokens import TokenAdapter
from eamet.sandbox import World
from eamet.sandbox.pocket import default_world, edit_config, pocket_model, world_corpus
from sweeps import check_idle, format_row, header, merged, plot


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=ints, default=[64, 256, 1024, 4096])
    parser.add_argument("--prefix-lens", type=ints, default=[0, 5, 50])
    parser.add_argument("--methods", default="eamet,memit")
    parser.add_argument("--data", help="CounterFact JSON (ROME or EasyEdit form) to build the world from")
    parser.add_argument("--records", type=int, help="first N records of --data")
    parser.add_argument(
        "--eval-cases", type=int, default=256, help="evaluate at most this many of the N edited cases"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--plot", help="write a PNG of strict metrics against N (needs matplotlib)")
    parser.add_argument(
        "--merge", action="append", default=[], help="an earlier --json output to include (repeatable)"
    )
    parser.add_argument("--allow-busy", action="store_true", help="run even if other work loads the CPUs")
    args = parser.parse_args()
    check_idle(args.allow_busy)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]

    if args.data:
        world = World.from_cases(load_dataset("counterfact", args.data, limit=args.records))
    else:
        world = default_world()
    start = time.perf_counter()
    model, tokenizer = pocket_model(world, progress=True)
    print(
        f"# world: {args.data or 'default'} ({len(world.facts)} facts, {len(world.cases)} cases); "
        f"pocket model ready in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    tokens = TokenAdapter(tokenizer)
    prefixes = {n: evaluation_prefixes(model, tokens, n, seed=0) for n in args.prefix_lens}
    corpus = world_corpus(world)
    rows: list[dict[str, Any]] = []

    def measure(n_edits: int, method: str, cases: list[Any], extra: dict[str, Any]) -> None:
        for length, pre in prefixes.items():
            report = evaluate(
                model, tokenizer, cases, prefixes=pre, prefix_len=length, fluency=False, progress=False
            )
            row = {"edits": n_edits, "method": method, "prefix_len": length, **report.metrics(), **extra}
            rows.append(row)
            print(format_row(row), flush=True)

    print(header(), flush=True)
    for n_edits in args.edits:
        if n_edits > len(world.cases):
            print(f"# skipping N = {n_edits}: the world has {len(world.cases)} cases", flush=True)
            continue
        cases = list(world.cases[:n_edits])
        # Every edited case is edited; the first --eval-cases of them (the order is already random) are
        # evaluated: with 50-token prefixes, specificity alone is 100 sequences per case.
        evaluated = cases[: args.eval_cases]
        measure(n_edits, "before", evaluated, {})
        for method in methods:
            editor = Editor(model, tokenizer, config=edit_config(model, method), corpus=corpus)
            editor.covariance(progress=False)  # C is shared by both methods: collect it outside the timing
            began = time.perf_counter()
            result = editor.edit([c.rewrite for c in cases], progress=False)
            try:
                seconds = time.perf_counter() - began
                report = result.misalignment
                extra = {
                    "misalignment_total": float(report.total) if report is not None else None,
                    "edit_seconds": seconds,
                }
                measure(n_edits, method, evaluated, extra)
            finally:
                result.undo()
    command = "python " + " ".join(sys.argv)
    print(
        f"# {command}\n# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads"
    )
    commands, rows = merged(args.merge, command, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"commands": commands, "rows": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot, methods)


if __name__ == "__main__":
    main()
