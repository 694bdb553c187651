"""Why does EAMET's alignment loss behave as it does on a model? Geometry and per-iteration loss terms.

    python benches/probe_alignment.py --model smollm2 --edits 32 --json probe.json

Edits the first N cases (default: the shipped cases the model knows) with MEMIT and with EAMET variants
(each from the unedited weights), and reports for each:

* the geometry the alignment loss sees, before editing: key norms ‖k‖ and hidden-state norms ‖h‖ at l*,
  the mean pairwise cosine of the keys and of the hidden states (how anisotropic they are);
* after the residual step: the mean final loss terms (NLL, alignment KL, top-M MSE), ‖δ‖ / ball radius,
  the mean pairwise cosine of the residuals, the misalignment in both KL directions and both supports
  (j ≠ i as the report, j < i as the loss), and strict efficacy on the rewrite prompts;
* per iteration, the mean of each loss term over the facts (how the terms trade off during optimisation).

Variants: ``NAME=METHOD[:key=value,...]`` over the model's settings (its preset, else ``for_model``), as in
bench_real.py. Default: MEMIT; EAMET with the reference ball 2‖k‖; EAMET as the preset (MEMIT's ball on
SmolLM2); that without alignment terms, with each alignment term alone, and with the alignment gated on
the NLL (``align_below_nll=0.1``, eamet's extension).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import eamet
from bench_real import settings, variant
from eamet.base.settings import EditConfig
from eamet.edit.editor import Editor
from eamet.edit.keys import PromptSet
from eamet.edit.optimizer import ResidualOptimizer
from eamet.measure.evaluation import evaluate
from eamet.models import config_for
from sweeps import check_idle

REFERENCE_BALL = "clamp=key_norm,clamp_factor=2.0"
DEFAULT_VARIANTS = [
    "memit",
    f"eamet-reference-ball=eamet:{REFERENCE_BALL}",
    "eamet",
    "eamet-no-align=eamet:cs_factor=0,mse_factor=0",
    "eamet-kl-only=eamet:mse_factor=0",
    "eamet-mse-only=eamet:cs_factor=0",
    "eamet-gated=eamet:align_below_nll=0.1",
]


def mean_offdiag_cos(x: torch.Tensor) -> float:
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    n = cos.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", help="cases (default: the shipped cases a known model knows)")
    parser.add_argument("--edits", type=int, default=32)
    parser.add_argument("--variant", action="append", type=variant, default=[])
    parser.add_argument("--set", type=settings, default={}, help="k=v,... for every variant")
    parser.add_argument(
        "--corpus", default="cases", help="cases (texts of the other cases), model:<n>, a file"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-busy", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_idle(args.allow_busy)
    variants = args.variant or [variant(v) for v in DEFAULT_VARIANTS]

    from eamet.app.loading import load_model
    from eamet.base.records import cases_texts, dataset_kind, load_dataset

    model, tokenizer = load_model(args.model)
    if args.data is None:
        cases = eamet.models.known_facts(args.model)
    else:
        cases = load_dataset(dataset_kind(args.data), args.data)
    edited = cases[: args.edits]
    corpus: Any = cases_texts(cases[args.edits :]) if args.corpus == "cases" else args.corpus
    out: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "variants": {}}
    for name, method, overrides in variants:
        config = config_for(model, method, name=args.model).replace(**{**overrides, **args.set})
        editor = Editor(model, tokenizer, config=config, corpus=corpus)
        editor.covariance(progress=False)
        if "geometry" not in out:
            out["geometry"] = geometry(editor, edited, config)
            print("geometry:", json.dumps(out["geometry"]), flush=True)
        trace: list[list[dict[str, float]]] = []
        began = time.perf_counter()
        with record_terms(trace):
            result = editor.edit([c.rewrite for c in edited], progress=False)
        try:
            seconds = time.perf_counter() - began
            row = summarise(result, edited, model, tokenizer, trace, seconds)
        finally:
            result.undo()
        out["variants"][name] = {"method": method, "overrides": overrides, **row}
        brief = {k: v for k, v in row.items() if k != "per_iteration"}
        print(name, json.dumps(brief), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def geometry(editor: Editor, cases: list[Any], config: EditConfig) -> dict[str, float]:
    """Norms and anisotropy of the keys and hidden states at l* on the unedited model."""
    from eamet.edit.keys import collect

    templates = editor._templates()
    prompts = PromptSet.build(editor.tokens, [c.rewrite for c in cases], templates, config.fact_token)
    layer = config.layers[-1]
    keys, hidden = collect(
        editor.model, editor.parts, editor.tokens, prompts, key_layer=layer, hidden_layer=layer
    )
    assert keys is not None and hidden is not None
    return {
        "key_norm_mean": float(keys.norm(dim=1).mean()),
        "hidden_norm_mean": float(hidden.norm(dim=1).mean()),
        "key_cos_mean": mean_offdiag_cos(keys),
        "hidden_cos_mean": mean_offdiag_cos(hidden),
    }


class record_terms:  # noqa: N801 - a context manager used like a function
    """Records each batch's loss terms at every iteration (means over the batch's facts), by wrapping
    ``ResidualOptimizer._descend`` (a new batch) and ``_terms`` (one iteration)."""

    def __init__(self, trace: list[list[dict[str, float]]]) -> None:
        self.trace = trace
        self.real_terms, self.real_descend = ResidualOptimizer._terms, ResidualOptimizer._descend

    def __enter__(self) -> None:
        real_terms, real_descend, trace = self.real_terms, self.real_descend, self.trace

        def descend(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            trace.append([])
            return real_descend(optimizer, *args, **kwargs)

        def terms(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            found = real_terms(optimizer, *args, **kwargs)
            trace[-1].append(
                {k: float(getattr(found, k).detach().mean()) for k in ("nll", "alignment_kl", "topm_mse")}
            )
            return found

        ResidualOptimizer._terms = terms  # type: ignore[method-assign]
        ResidualOptimizer._descend = descend  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        ResidualOptimizer._terms = self.real_terms  # type: ignore[method-assign]
        ResidualOptimizer._descend = self.real_descend  # type: ignore[method-assign]


def summarise(
    result: Any,
    cases: list[Any],
    model: Any,
    tokenizer: Any,
    trace: list[list[dict[str, float]]],
    seconds: float,
) -> dict[str, Any]:
    stats = result.stats
    n = len(stats)
    keys = result.updates[-1].keys.numpy()
    deltas = result.deltas.numpy()
    full = eamet.misalignment(keys, deltas, progress=False)
    progressive = eamet.misalignment(keys, deltas, progressive=True, progress=False)
    metrics = evaluate(model, tokenizer, cases, prefix_len=0, fluency=False, progress=False).metrics()
    longest = max((len(batch) for batch in trace), default=0)
    per_iteration = [
        {
            k: float(np.mean([batch[i][k] for batch in trace if len(batch) > i]))
            for k in ("nll", "alignment_kl", "topm_mse")
        }
        for i in range(longest)
    ]
    return {
        "seconds": seconds,
        "efficacy_strict": metrics["efficacy_strict"],
        "generalization_strict": metrics["generalization_strict"],
        "specificity_strict": metrics["specificity_strict"],
        "nll": sum(s.nll for s in stats) / n,
        "alignment_kl": sum(s.alignment_kl for s in stats) / n,
        "topm_mse": sum(s.topm_mse for s in stats) / n,
        "delta_over_radius": sum(s.delta_norm / s.radius for s in stats) / n,
        "delta_over_h": sum(s.delta_norm / s.h_norm for s in stats) / n,
        "residual_cos_mean": mean_offdiag_cos(result.deltas),
        "misalignment_total": full.total,
        "misalignment_reverse_total": float(full.reverse_scores.sum()),
        "misalignment_progressive_reverse_total": float(progressive.reverse_scores.sum()),
        "overlap_mean": float(full.overlap.mean()),
        "per_iteration": per_iteration,
    }


if __name__ == "__main__":
    main()
