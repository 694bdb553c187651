"""How fast eamet samples a ``model:<n>`` corpus, and how many documents C needs.

Three parts, on a model eamet knows (SmolLM2-135M by default), on an idle machine:

1. **Sampler.** Documents per second of eamet's batched sampler (KV cache, nucleus from a top-k; one
   batch per batch size) against ``model.generate`` with transformers' top-p (a full sort of the
   vocabulary at every step), the path eamet used before, on the same batch.
2. **model:<n>.** The whole corpus through ``eamet.edit.model_corpus.sample_texts`` at the default batch size,
   into eamet's cache (so later edits reuse it), timed when it was not cached yet: the minutes a first
   edit waits.
3. **C against n.** C at the preset's blocks from the first n of those documents (``mom2_n_samples``),
   for each ``--prefixes`` n: its relative Frobenius distance to the C of all of them and the tokens it
   saw. Whether the edits get worse with a smaller n is measured by ``bench_real.py`` with one variant
   per ``mom2_n_samples`` and the residuals from a store (docs/benchmarks.md gives the command).

``--templates-only`` instead times the preset's context templates (what every new ``Editor`` samples)
with the model's KV cache and without, and checks that the texts are the same.

    python benches/bench_model_corpus.py --model smollm2 --documents 1000 --prefixes 125,250,500 \
        --json docs/model_corpus_smollm2.json
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

from eamet.base.files import atomic_write
from eamet.edit import model_corpus
from eamet.edit.moment_collector import SecondMomentCollector, default_cache_dir
from eamet.model.fingerprint import model_fingerprint
from eamet.model.parts import ModelParts
from eamet.model.templates import generate_templates
from eamet.model.tokens import TokenAdapter
from sweeps import check_idle


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def old_sampler_seconds(model: Any, tokens: TokenAdapter, batch: int) -> float:
    """``batch`` documents through ``model.generate`` (transformers' top-p sorts the whole vocabulary)."""
    opening = tokens.encode(model_corpus.OPENINGS[0])
    inputs = torch.tensor([opening] * batch)
    torch.manual_seed(0)
    began = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            do_sample=True,
            max_new_tokens=model_corpus.DOCUMENT_TOKENS,
            min_new_tokens=model_corpus.DOCUMENT_TOKENS,  # the same work as the new path's full batch
            pad_token_id=tokens.pad_id,
            **model_corpus.SAMPLING,
        )
    return time.perf_counter() - began


def new_sampler_seconds(model: Any, tokens: TokenAdapter, batch: int) -> float:
    """``batch`` documents through eamet's sampler (EOS ignored: every document runs its full length)."""
    opening = tokens.encode(model_corpus.OPENINGS[0])
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    with torch.no_grad():
        model_corpus._continue(model, torch.tensor([opening] * batch), generator, None, lambda steps: None)
    return time.perf_counter() - began


class _NoCache(torch.nn.Module):
    """The model behind a forward that takes no KV cache: the templates' uncached loop."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids)


def template_seconds(model: Any, tokens: TokenAdapter, config: Any) -> dict[str, Any]:
    """The preset's context templates sampled with the KV cache and without: seconds, and whether the
    texts are the same."""
    settings = {
        "length": config.template_length,
        "temperature": config.template_temperature,
        "top_k": config.template_top_k,
        "top_p": config.template_top_p,
        "seed": config.seed,
    }
    out: dict[str, Any] = {}
    texts = []
    for name, runner in (("cached", model), ("uncached", _NoCache(model))):
        began = time.perf_counter()
        texts.append(generate_templates(runner, tokens, config.template_seeds, **settings))
        out[f"{name}_s"] = time.perf_counter() - began
    out["templates"], out["same"] = len(texts[0]), texts[0] == texts[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="a model eamet knows")
    parser.add_argument("--documents", type=int, default=1000, help="n of the model:<n> corpus timed")
    parser.add_argument("--batch-sizes", type=ints, default=[64, 128, 256], help="sampler batches timed")
    parser.add_argument("--old-batch", type=int, default=64, help="batch of the model.generate baseline")
    parser.add_argument("--skip-probes", action="store_true", help="skip part 1 (the sampler per batch)")
    parser.add_argument(
        "--templates-only",
        action="store_true",
        help="time only the preset's context templates, with the KV cache and without",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=model_corpus.BATCH_SIZE,
        help="batch of part 2 (default: eamet's)",
    )
    parser.add_argument("--prefixes", type=ints, default=[125, 250, 500], help="n of the smaller C's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-busy", action="store_true")
    parser.add_argument("--json", help="write the measurements as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = check_idle(args.allow_busy)

    from eamet.app.loading import load_model
    from eamet.models import config_for

    model, tokenizer = load_model(args.model)
    model.eval()
    tokens = TokenAdapter(tokenizer)
    config = config_for(model, "memit", name=args.model)
    out: dict[str, Any] = {
        "model": args.model,
        "load_average": load,
        "document_tokens": model_corpus.DOCUMENT_TOKENS,
    }

    if args.templates_only:
        timed = out["templates"] = template_seconds(model, tokens, config)
        print(
            f"{timed['templates']} context templates: {timed['cached_s']:.1f} s with the KV cache, "
            f"{timed['uncached_s']:.1f} s without; the same texts: {timed['same']}"
        )
        finish(out, args.json)
        return

    out["sampler"] = []
    if not args.skip_probes:
        old = old_sampler_seconds(model, tokens, args.old_batch)
        out["old_sampler"] = {"batch": args.old_batch, "seconds": old, "docs_per_s": args.old_batch / old}
        rate = args.old_batch / old
        print(f"model.generate, batch {args.old_batch}: {old:.1f} s, {rate:.2f} docs/s", flush=True)
    for batch in args.batch_sizes if not args.skip_probes else []:
        seconds = new_sampler_seconds(model, tokens, batch)
        out["sampler"].append({"batch": batch, "seconds": seconds, "docs_per_s": batch / seconds})
        print(f"eamet sampler,  batch {batch}: {seconds:.1f} s, {batch / seconds:.2f} docs/s", flush=True)

    parts = ModelParts(model)
    # Sampled into eamet's own cache, so that the edits that follow (and `eamet eval --samples n`) reuse
    # these texts; timed only when the entry did not exist yet.
    corpora = default_cache_dir() / "corpora"
    before = set(corpora.iterdir()) if corpora.is_dir() else set()
    began = time.perf_counter()
    texts = model_corpus.sample_texts(
        model, tokens, args.documents, model_fingerprint=model_fingerprint(model, parts), root=corpora,
        batch_size=args.batch,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    if corpora.is_dir() and set(corpora.iterdir()) == before:
        print(f"model:{args.documents} was already cached in {corpora}: not timed", flush=True)
        seconds = float("nan")
    out["corpus"] = {"documents": args.documents, "seconds": seconds}
    print(f"model:{args.documents}, uncached: {seconds / 60:.2f} min", flush=True)

    with tempfile.TemporaryDirectory(prefix="eamet-corpus-c-") as root:
        corpus_file = Path(root) / "texts.txt"
        corpus_file.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")

        def moments(n: int) -> dict[int, Any]:
            return SecondMomentCollector(
                model, parts, tokens, corpus=str(corpus_file), n_samples=n, max_length=config.mom2_max_length,
                use_cache=False, progress=False,
            ).moments(list(config.layers))  # fmt: skip

        full = moments(args.documents)
        out["c_against_n"] = []
        for n in args.prefixes:
            part = moments(n)
            for layer in config.layers:
                a, b = torch.from_numpy(part[layer].moment()), torch.from_numpy(full[layer].moment())
                distance = float((a - b).norm() / b.norm())
                row = {
                    "documents": n,
                    "layer": layer,
                    "tokens": part[layer].count,
                    "relative_distance": distance,
                }
                out["c_against_n"].append(row)
                whole = args.documents
                print(f"C from {n:>5} documents, block {layer}: {row['tokens']} tokens, "
                      f"‖C_n − C_{whole}‖/‖C_{whole}‖ = {distance:.4f}", flush=True)  # fmt: skip

    finish(out, args.json)


def finish(out: dict[str, Any], json_path: str | None) -> None:
    """Prints the command and machine, and writes ``out`` (with the command) to ``json_path``."""
    command = "python " + " ".join(sys.argv)
    out["command"] = command
    print(f"# {command}\n# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if json_path:
        text = json.dumps(out, indent=1) + "\n"

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        atomic_write(Path(json_path), write)


if __name__ == "__main__":
    main()
