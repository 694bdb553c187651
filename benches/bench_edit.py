"""End-to-end cost of an edit on CPU: EAMET against MEMIT, at several model and batch sizes.

Each (model, N, method) cell runs in its own freshly spawned process on the random-LLaMA world of
``examples/edit_random_model.py`` (invented subjects, a BPE tokenizer trained on the spot, a corpus for
C): nothing is downloaded. Settings are ``EditConfig.for_model`` (the reference's step counts, learning
rate, loss weights and top-M), with ``clamp_factor=4`` and no norm penalty, as in the example, because a
random model's hidden states are small. The table shows:

* ``C s``: collecting C = E[k kᵀ] for the edited layers (the corpus is the same for every N);
* ``residual s/fact``: mean and median seconds of one fact's residual optimisation (forward + backward
  per step; for EAMET the alignment terms against the residuals already found);
* ``solve s``: the float64 Cholesky solves of all edited layers (``solve_layer``, d_ff × d_ff systems);
* ``rest s``: the rest of ``Editor.edit`` (templates, keys per layer, neighbour lists, applying the
  updates, the misalignment report);
* ``peak MiB``: the process's peak RSS above the model and inputs, over C and the edit;
* ``hits``: facts whose prompt now yields the target's first token greedily (a random model knows no
  facts, so this checks the mechanics, not editing quality);
* ``misalign``: the misalignment total of the residuals against the keys at the last edited layer.

Full run (about 20 minutes on 2 cores), a quick smoke test, and one cell:

    python benches/bench_edit.py --json bench-edit.json
    python benches/bench_edit.py --quick
    python benches/bench_edit.py --models small --facts 1000 --methods eamet
    python benches/bench_edit.py --models tiny --facts 100 --methods eamet --set cs_factor=0
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    base_parser,
    configure_threads,
    machine_info,
    markdown_table,
    measure,
    print_header,
    rss_note,
    run_isolated,
    save_json,
    set_eamet_threads,
    set_torch_threads,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

MODELS = {
    # name: (layers, hidden, ffn)
    "tiny": (4, 64, 256),
    "small": (6, 256, 1024),
}
METHODS = ("eamet", "memit")


def worker(
    model_name: str, n_facts: int, method: str, threads: int, eamet_threads: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Runs in a fresh process: builds the world, collects C, edits, and returns the numbers."""
    set_torch_threads(threads)
    pool = set_eamet_threads(eamet_threads)
    import eamet
    from edit_random_model import first_token_hits, random_world

    layers, hidden, ffn = MODELS[model_name]
    model, tokenizer, facts, corpus = random_world(n_facts, hidden=hidden, ffn=ffn, layers=layers)
    settings = {"mom2_n_samples": len(corpus), "clamp_factor": 4.0, "norm_penalty": "none", **overrides}
    config = eamet.EditConfig.for_model(model, method, **settings)
    # Time the solves (one per edited layer) by wrapping the function the editor calls.
    import eamet.edit.editor

    solve_times: list[float] = []
    solve_layer = eamet.edit.editor.solve_layer

    def timed_solve(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = solve_layer(*args, **kwargs)
        solve_times.append(time.perf_counter() - start)
        return out

    eamet.edit.editor.solve_layer = timed_solve
    with tempfile.TemporaryDirectory() as cache:
        editor = eamet.Editor(model, tokenizer, config=config, corpus=corpus, cache_dir=cache)
        times: dict[str, float] = {}

        def run() -> eamet.EditResult:
            start = time.perf_counter()
            editor.covariance(progress=False)
            times["covariance_s"] = time.perf_counter() - start
            start = time.perf_counter()
            result = editor.edit(facts, progress=False)
            times["edit_s"] = time.perf_counter() - start
            return result

        measurement, result = measure(run, repeats=1)
    residual = [s.seconds for s in result.stats]
    summary = result.summary()
    return {
        "model": model_name,
        "facts": n_facts,
        "method": method,
        "layers": list(config.layers),
        "eamet_threads": pool,
        **times,
        "residual_mean_s": statistics.fmean(residual),
        "residual_median_s": statistics.median(residual),
        "residual_total_s": sum(residual),
        "solve_s": sum(solve_times),
        "rest_s": times["edit_s"] - sum(residual) - sum(solve_times),
        "mean_steps": summary["mean"]["steps"],
        "hits": first_token_hits(model, editor, facts),
        "misalignment_total": summary["misalignment_total"],
        "measurement": measurement,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--facts", default=None, help="comma-separated N (default 100,1000; tiny: 1000 only)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: eamet, memit")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an EditConfig setting for every cell, e.g. --set cs_factor=0 (repeatable)",
    )
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item}: the value must be JSON (strings in double quotes)")
    configure_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown models or methods: {', '.join(unknown)}")
    if args.quick:
        cells = [("tiny", 8, method) for method in methods]
    elif args.facts is not None:
        sizes = [int(n) for n in args.facts.split(",")]
        cells = [(m, n, method) for m in models for n in sizes for method in methods]
    else:
        # N = 1000 on the small model takes about half an hour per method on 2 cores: ask for it.
        plan = {"tiny": (100, 1000), "small": (100,)}
        cells = [(m, n, method) for m in models for n in plan[m] for method in methods]

    info = machine_info(args.threads, args.eamet_threads)
    print_header("Editor.edit end to end on CPU (random LLaMA world)", info)
    if overrides:
        print(f"settings changed for every cell: {overrides}\n")
    rows, raw = [], []
    for model_name, n, method in cells:
        out = run_isolated(worker, model_name, n, method, args.threads, args.eamet_threads, overrides)
        raw.append(out)
        layers, hidden, ffn = MODELS[model_name]
        total = out["misalignment_total"]
        rows.append(
            [
                f"{model_name} ({layers}L, d={hidden}, d_ff={ffn})",
                str(n),
                method,
                f"{out['covariance_s']:.1f}",
                f"{out['residual_mean_s']:.3f} / {out['residual_median_s']:.3f}",
                f"{out['mean_steps']:.1f}",
                f"{out['solve_s']:.3f}",
                f"{out['rest_s']:.1f}",
                f"{out['covariance_s'] + out['edit_s']:.1f}",
                f"{out['measurement'].peak_above_inputs_mib:.0f}",
                f"{out['hits']}/{n}",
                "-" if total is None else f"{total:.3g}",
            ]
        )
        print(f"done: {model_name} N={n} {method}", flush=True)
    print()
    print(
        markdown_table(
            [
                "model",
                "N",
                "method",
                "C s",
                "residual s/fact (mean / median)",
                "steps",
                "solve s",
                "rest s",
                "total s",
                "peak MiB",
                "hits",
                "misalign",
            ],
            rows,
        )
    )
    note = rss_note([r["measurement"] for r in raw])
    if note:
        print(note)
    if args.json:
        results = [{**r, "measurement": r["measurement"].to_json()} for r in raw]
        save_json(args.json, {"machine": info, "results": results})


if __name__ == "__main__":
    main()
