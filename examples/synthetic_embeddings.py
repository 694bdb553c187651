"""Writes a synthetic keys/residuals pair with planted misalignment, for trying `eamet diagnose`.

Keys are clustered (facts that share a relation sit near each other, as in a real MLP's key space).
Residuals are the keys under a random rotation and per-fact scaling — a transformation that keeps
every cosine neighbourhood, so those facts are aligned — except for a planted fraction whose residuals
are replaced by random directions. The diagnostic should put the planted facts at the top of its list.

    python examples/synthetic_embeddings.py --out /tmp/eamet-demo --n 10000 --d 1024
    eamet diagnose /tmp/eamet-demo/keys.npy /tmp/eamet-demo/residuals.npy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make(n: int, d: int, clusters: int, planted: float, seed: int) -> tuple[np.ndarray, ...]:
    """Returns (keys, residuals, planted_rows); keys and residuals are (n, d) float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    keys = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d), dtype=np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32)
    residuals = (keys @ rotation.astype(np.float32)) * scale
    rows = np.sort(rng.choice(n, size=round(planted * n), replace=False))
    residuals[rows] = rng.standard_normal((rows.size, d), dtype=np.float32)
    return keys, residuals, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for keys.npy, residuals.npy")
    parser.add_argument("--n", type=int, default=10_000, help="facts (default %(default)s)")
    parser.add_argument("--d", type=int, default=1024, help="dimension (default %(default)s)")
    parser.add_argument("--clusters", type=int, default=64, help="key clusters (default %(default)s)")
    parser.add_argument(
        "--planted", type=float, default=0.02, help="misaligned fraction (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keys, residuals, rows = make(args.n, args.d, args.clusters, args.planted, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "keys.npy", keys)
    np.save(args.out / "residuals.npy", residuals)
    np.save(args.out / "planted_rows.npy", rows)
    shown = ", ".join(map(str, rows[:10]))
    print(f"wrote {args.out}/keys.npy and residuals.npy: {args.n} facts, d = {args.d}")
    print(f"{rows.size} planted misaligned facts (planted_rows.npy), e.g. {shown}")


if __name__ == "__main__":
    main()
