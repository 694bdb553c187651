"""What a residual store saves: a λ × N grid of edits with and without it, on one machine in one run.

    python benches/bench_store.py --model pocket --method memit --edits 16,32,64,128 \\
        --lambdas 0.25,0.5,1,2,4 --json store_pocket.json
    python benches/bench_store.py --model smollm2 --method memit --edits 2,4,8,16 \\
        --lambdas 250,558.1,1000,2093,4000 --json store_smollm2.json

``--lambdas`` are absolute λ (the same for every edited block), or with ``--relative`` multiples of the
model's own λ. Without the store, each of the len(λ) × len(N) cells is a fresh ``Editor.edit`` of the
first N facts (the residual step runs every time). With the store, one edit of the largest N fills a
fresh store, then every cell is ``Editor.edit(..., residual_store=...)``: the residuals come from the
store (prefix reuse; for EAMET at batch boundaries), only keys, statistics (cached in memory by the
editor) and the solve run. A third column times ``Editor.resolve`` of the largest-N edit per λ. The
script checks that every cell's weight change is the same both ways (largest relative difference
printed) and prints the machine's load at start (it refuses a busy machine unless ``--allow-busy``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from eamet.app.demo import CASES_CORPUS_DOCUMENTS
from eamet.base.files import atomic_write
from eamet.base.settings import METHODS
from eamet.edit.editor import Editor
from eamet.models import config_for
from sweeps import check_idle


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def setup(name: str, method: str) -> tuple[Any, Any, list[Any], Any, Any]:
    """Model, tokenizer, facts, corpus for C and the method's config for the model."""
    if name == "pocket":
        from eamet.sandbox.pocket import default_world, edit_config, pocket_model, world_corpus

        world = default_world()
        model, tokenizer = pocket_model(world, progress=False)
        return (
            model,
            tokenizer,
            [c.rewrite for c in world.cases],
            world_corpus(world),
            edit_config(model, method),
        )
    import eamet.models
    from eamet.app.loading import load_model
    from eamet.base.records import cases_texts

    model, tokenizer = load_model(name)
    cases = eamet.models.known_facts(name)
    # C from the texts of the cases never edited here (the demo's choice: free, no sampling), as many
    # of them as the demo reads.
    return (
        model,
        tokenizer,
        [c.rewrite for c in cases],
        cases_texts(cases[256:]),
        config_for(model, method, name=name).replace(mom2_n_samples=CASES_CORPUS_DOCUMENTS),
    )


def weight_change(result: Any) -> list[torch.Tensor]:
    return [u.weight_change() for u in result.updates]


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pocket", help="pocket or a model eamet knows (smollm2)")
    parser.add_argument("--method", choices=METHODS, default="memit")
    parser.add_argument("--edits", type=lambda t: [int(x) for x in t.split(",")], default=[16, 32, 64, 128])
    parser.add_argument("--lambdas", type=numbers, default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--relative", action="store_true", help="--lambdas are multiples of the model's λ")
    parser.add_argument("--fact-batch", type=int, default=1, help="facts per residual batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-busy", action="store_true")
    parser.add_argument("--json", help="write the cells and totals as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = check_idle(args.allow_busy)
    model, tokenizer, facts, corpus, config = setup(args.model, args.method)
    config = config.replace(fact_batch=args.fact_batch)
    base = config.mom2_update_weight[-1]
    lambdas = [lam * base if args.relative else lam for lam in args.lambdas]
    configs = {lam: config.replace(mom2_update_weight=lam) for lam in lambdas}
    editors = {lam: Editor(model, tokenizer, config=c, corpus=corpus) for lam, c in configs.items()}
    for editor in editors.values():
        editor.covariance(progress=False)  # C is collected once, outside every timing
    print(f"# {args.model}, {args.method}, blocks {list(config.layers)}, λ {lambdas}, N {args.edits}")

    cells: list[dict[str, Any]] = []
    without: dict[tuple[int, float], list[torch.Tensor]] = {}
    for n in args.edits:
        for lam, editor in editors.items():
            began = time.perf_counter()
            result = editor.edit(facts[:n], progress=False)
            seconds = time.perf_counter() - began
            without[(n, lam)] = weight_change(result)
            result.undo()
            cells.append({"edits": n, "lambda": lam, "without_store_s": seconds})
            print(f"without store  N {n:>5}  λ {lam:>10.4g}  {seconds:8.2f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="eamet-store-") as root:
        store = Path(root) / "store"
        began = time.perf_counter()
        largest = editors[lambdas[0]].edit(facts[: max(args.edits)], residual_store=store, progress=False)
        fill = time.perf_counter() - began
        largest.undo()
        print(f"filling the store with N {max(args.edits)}: {fill:.2f} s", flush=True)
        worst = 0.0
        for cell in cells:
            n, lam = cell["edits"], cell["lambda"]
            began = time.perf_counter()
            result = editors[lam].edit(facts[:n], residual_store=store, progress=False)
            cell["with_store_s"] = time.perf_counter() - began
            assert all(s.reused for s in result.stats), "a cell optimised residuals despite the store"
            cell["relative_difference"] = largest_difference(weight_change(result), without[(n, lam)])
            worst = max(worst, cell["relative_difference"])
            result.undo()
            print(f"with store     N {n:>5}  λ {lam:>10.4g}  {cell['with_store_s']:8.2f} s", flush=True)
        resolves = []
        for lam in lambdas:
            began = time.perf_counter()
            result = editors[lam].resolve(largest, mom2_update_weight=lam, progress=False)
            resolves.append({"lambda": lam, "resolve_s": time.perf_counter() - began})
            result.undo()

    total_without = sum(c["without_store_s"] for c in cells)
    total_with = fill + sum(c["with_store_s"] for c in cells)
    print("\n| N | λ | without store (s) | with store (s) |\n|---:|---:|---:|---:|")
    for c in cells:
        print(f"| {c['edits']} | {c['lambda']:g} | {c['without_store_s']:.2f} | {c['with_store_s']:.2f} |")
    print(
        f"\ngrid of {len(cells)} edits: {total_without:.1f} s without the store; with it {total_with:.1f} s "
        f"({fill:.1f} s to fill it at N = {max(args.edits)}, then {total_with - fill:.1f} s): "
        f"{total_without / total_with:.1f}x less"
    )
    print(
        "re-solve of the N = {} edit per λ: {}".format(
            max(args.edits), ", ".join(f"{r['resolve_s']:.2f} s" for r in resolves)
        )
    )
    print(f"largest relative difference of a cell's weight change, store vs fresh: {worst:.2e}")
    command = "python " + " ".join(sys.argv)
    print(f"# {command}\n# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if args.json:
        payload = {
            "command": command,
            "load_average": load,
            "model": args.model,
            "method": args.method,
            "layers": list(config.layers),
            "cells": cells,
            "fill_seconds": fill,
            "resolve": resolves,
            "total_without_s": total_without,
            "total_with_s": total_with,
            "largest_relative_difference": worst,
        }
        text = json.dumps(payload, indent=1) + "\n"
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    main()
