"""How fast a pocket model learns a world: recall against wall time on this machine.

    python benches/bench_pocket_training.py [--subjects 250] [--data COUNTERFACT.json --records 1000]
        [--arch llama|gpt2] [--threads 2]

Trains from scratch (no cache) with the default settings and prints the recall history (every
(fact, phrasing) pair, greedy, strict) and the total seconds. The brief's target: >= 98 % recall of 1000
facts in <= 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from eamet.base.records import load_dataset
from eamet.sandbox import World
from eamet.sandbox.pocket import PocketSettings, _statements, train_pocket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=250, help="generated world: people (4 facts each)")
    parser.add_argument("--data", help="CounterFact JSON to build the world from instead")
    parser.add_argument("--records", type=int, help="first N records of --data")
    parser.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data:
        world = World.from_cases(load_dataset("counterfact", args.data, limit=args.records))
    else:
        world = World.generate(seed=0, n_subjects=args.subjects)
    statements = len(_statements(world))
    print(f"# {len(world.facts)} facts, {statements} statements to recall ({args.data or 'generated world'})")
    _, _, report = train_pocket(world, PocketSettings(arch=args.arch), progress=False)
    for epoch, loss, recall in report.history:
        if recall is not None:
            print(f"epoch {epoch:>3}  loss {loss:.3f}  recall {recall:.4f}")
    print(f"recall {report.recall:.4f} after {report.epochs} epochs in {report.seconds:.0f} s")
    where = f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads"
    print(f"# python {' '.join(sys.argv)}  ({where})")


if __name__ == "__main__":
    main()
