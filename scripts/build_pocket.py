"""Builds the pocket model that ships inside the package: the default world's, with default settings.

    python scripts/build_pocket.py [--out python/eamet/sandbox/data/pocket-default]

Deterministic for a given torch/transformers/tokenizers version on a CPU (seeded initialisation, data order
and prefixes; 2 threads). Prints the training report and the SHA-256 of every file, which the manifest
(pocket.json) records and `eamet.sandbox.pocket_model` checks on every load.
"""

from __future__ import annotations

import argparse
import json

import torch

from eamet.sandbox.pocket import PocketSettings, default_world, save_pocket, shipped_model_dir, train_pocket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(shipped_model_dir()))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world, settings = default_world(), PocketSettings()
    model, tokenizer, report = train_pocket(world, settings, progress=True)
    if report.recall < settings.target_recall:
        raise SystemExit(
            f"recall {report.recall:.4f} < target {settings.target_recall}: not shipping this model"
        )
    out = save_pocket(args.out, model, tokenizer, world, settings, report)
    manifest = json.loads((out / "pocket.json").read_text())
    print(
        f"world: {len(world.facts)} facts, {len(world.cases)} edit cases, fingerprint {world.fingerprint()}"
    )
    print(f"recall {report.recall:.4f} after {report.epochs} epochs in {report.seconds:.0f} s")
    for name, digest in manifest["files"].items():
        print(f"  {digest}  {name}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
