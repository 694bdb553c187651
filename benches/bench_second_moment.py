"""Benchmark of ``eamet.SecondMoment.update`` against torch (CPU) and numpy accumulators.

For every dim in --dims, each method accumulates Σ x xᵀ over the same seeded batches of --batch-rows
standard-normal float32 rows, in its own freshly spawned process:

* ``eamet``: ``acc = eamet.SecondMoment(dim); acc.update(batch)`` (float32 GEMM of the upper triangle,
  added into a float64 sum), on eamet's own pool (``--eamet-threads``);
* ``torch``: ``acc += (X.T @ X).double()`` into a float64 tensor, ``torch.set_num_threads(--threads)``;
* ``numpy``: ``acc += (X.T @ X).astype(np.float64)`` (OpenBLAS, ``--threads`` threads);
* ``eamet f64``: eamet on the same batches converted to float64 beforehand (float64 GEMM).

Each method runs one untimed warm-up batch, then --batches timed ones; the table shows the median
seconds per batch, rows/s, and eamet's throughput over torch's (target of the issue: >= 1.5×). The final
moments (sum / count) must agree with numpy's within 1e-5 of the largest entry, or the script exits with
status 1.

Full run, then a quick smoke test:

    python benches/bench_second_moment.py --json bench-second-moment.json
    python benches/bench_second_moment.py --quick
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from common import (
    base_parser,
    configure_threads,
    machine_info,
    markdown_table,
    pass_fail,
    print_header,
    run_isolated,
    save_json,
    set_eamet_threads,
    set_torch_threads,
)

METHODS = ("numpy", "torch", "eamet", "eamet f64")
TARGET_RATIO = 1.5  # eamet rows/s over torch rows/s
TOLERANCE = 1e-5  # of the largest entry of the moment


def make_batches(dim: int, rows: int, count: int, dtype: type = np.float32) -> list[np.ndarray]:
    """``count`` seeded (rows, dim) standard-normal batches, drawn in float32, then cast to ``dtype``."""
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((rows, dim), dtype=np.float32).astype(dtype, copy=False) for _ in range(count)
    ]


def worker(
    method: str, dim: int, rows: int, batches: int, threads: int, eamet_threads: int
) -> dict[str, Any]:
    """Runs in a fresh process: times ``update`` per batch and returns the times and the moment."""
    data = make_batches(dim, rows, batches + 1, np.float64 if method == "eamet f64" else np.float32)
    if method.startswith("eamet"):
        import eamet

        used = set_eamet_threads(eamet_threads)
        acc = eamet.SecondMoment(dim)
        update = acc.update

        def moment() -> np.ndarray:
            return acc.moment()

    elif method == "torch":
        torch = set_torch_threads(threads)
        used = torch.get_num_threads()
        total = torch.zeros((dim, dim), dtype=torch.float64)

        def update(batch: np.ndarray) -> None:
            x = torch.from_numpy(batch)
            total.add_((x.T @ x).double())  # acc += (X.T @ X).double(), in place

        def moment() -> np.ndarray:
            return (total / (rows * (batches + 1))).numpy()

    else:
        used = threads
        acc64 = np.zeros((dim, dim))

        def update(batch: np.ndarray) -> None:
            nonlocal acc64
            acc64 += (batch.T @ batch).astype(np.float64)

        def moment() -> np.ndarray:
            return acc64 / (rows * (batches + 1))

    times = []
    for i, batch in enumerate(data):
        start = time.perf_counter()
        update(batch)
        if i > 0:  # batch 0 is the warm-up
            times.append(time.perf_counter() - start)
    return {"times_s": times, "threads": used, "moment": moment()}


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--dims", type=int, nargs="+", default=[1024, 4096], help="dims (default %(default)s)"
    )
    parser.add_argument("--batch-rows", type=int, default=2048, help="rows per batch (default %(default)s)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches (default %(default)s)")
    args = parser.parse_args()
    if args.quick:
        args.dims, args.batches = [256, 1024], 3
    configure_threads(args.threads)
    info = machine_info(args.threads, args.eamet_threads)
    print_header("eamet.SecondMoment.update vs torch and numpy", info)
    print(
        f"batches of {args.batch_rows} rows, 1 warm-up + {args.batches} timed per method "
        "(median reported), each method in its own process\n"
    )

    results: list[dict[str, Any]] = []
    for dim in args.dims:
        moments = {}
        for method in METHODS:
            out = run_isolated(
                worker, method, dim, args.batch_rows, args.batches, args.threads, args.eamet_threads
            )
            moments[method] = out.pop("moment")
            out.update(dim=dim, method=method, median_s=float(np.median(out["times_s"])))
            out["rows_per_s"] = args.batch_rows / out["median_s"]
            results.append(out)
            print(f"  measured {method:9s} dim={dim}: {out['median_s']:.4f} s/batch", file=sys.stderr)
        scale = float(np.abs(moments["numpy"]).max())
        for out in results[-len(METHODS) :]:
            out["max_diff_vs_numpy"] = float(np.abs(moments[out["method"]] - moments["numpy"]).max()) / scale
            out["agrees"] = out["max_diff_vs_numpy"] <= TOLERANCE

    rate = {(r["dim"], r["method"]): r["rows_per_s"] for r in results}
    rows = []
    for r in results:
        dim = r["dim"]
        vs_torch = r["rows_per_s"] / rate[(dim, "torch")]
        target = pass_fail(vs_torch >= TARGET_RATIO) if r["method"] == "eamet" else ""
        rows.append([
            dim, r["method"], r["threads"], r["median_s"], r["rows_per_s"], vs_torch,
            r["rows_per_s"] / rate[(dim, "numpy")], target, r["max_diff_vs_numpy"], pass_fail(r["agrees"]),
        ])  # fmt: skip
    headers = ["dim", "method", "threads", "s / batch", "rows / s", "throughput / torch"]
    headers += ["throughput / numpy"]
    headers += [f"eamet >= {TARGET_RATIO}× torch", "max moment diff vs numpy (rel. to max)", "agrees"]
    print(markdown_table(headers, rows))
    save_json(args.json, {"machine": info, "args": vars(args) | {"json": str(args.json)}, "results": results})
    if not all(r["agrees"] for r in results):
        print("\n**the moments disagree beyond the tolerance**")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
