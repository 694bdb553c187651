"""Benchmark of ``eamet.misalignment`` against full-matrix numpy and torch (CPU) references.

Measures, for every N in --n and d in --d, the median wall time of R calls and the peak RSS above the
inputs of three methods computing the same outputs (per-row KL scores, top-M overlap, top-M weighted
MSE) on the same data, each in its own freshly spawned process:

* ``eamet``: ``eamet.misalignment(keys, residuals, tau=0.07, top_m=50, progressive=False)``, on its
  own thread pool (``--eamet-threads``, default: eamet's own default);
* ``numpy``: the definitions with the two N×N float32 similarity matrices in memory (OpenBLAS with
  ``--threads`` threads);
* ``torch``: the same in torch on the CPU (``torch.set_num_threads(--threads)``).

Both references normalise the rows in float32, form S_k = K Kᵀ and S_r = R Rᵀ whole, mask the
diagonal, and then reduce blocks of 1024 rows (top-M by argpartition/topk, log-softmax at temperature
tau, KL(P_r‖P_k), overlap, MSE) in place, so that no third N×N array is created. The script checks
that the three agree (total score within 1e-3 relative, mean overlap within 1e-3, mean MSE within
1e-3 relative) and exits with status 1 if they do not.

Data (seeded): keys are clustered, centres[label] + 0.6·noise with 64 standard-normal centres;
residuals are 0.5 · (a signed permutation of the key's coordinates, an exact rotation) + s_i · noise
with s_i ~ U(0.5, 2) per row, so residual neighbourhoods keep part of the key neighbourhoods, to a
degree that varies by row (overlap well between 0 and 1).

Targets of the issue, checked when N = 10,000 and d = 1024 are measured: eamet time <= 0.6 × numpy,
and eamet peak RSS above the inputs <= 350 MiB.

Full run (defaults: N in {2000, 10000}, d in {1024, 4096}, 3 repeats), then a quick smoke test:

    python benches/bench_misalignment.py --json bench-misalignment.json
    python benches/bench_misalignment.py --quick
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from common import (
    MIB,
    Measurement,
    base_parser,
    configure_threads,
    machine_info,
    markdown_table,
    measure,
    pass_fail,
    print_header,
    rss_note,
    run_isolated,
    save_json,
    set_eamet_threads,
    set_torch_threads,
)

TAU = 0.07
TOP_M = 50
METHODS = ("numpy", "torch", "eamet")
REFERENCE_BLOCK = 1024  # rows reduced at a time by the references
TARGET_SIZE = (10_000, 1024)
TARGET_TIME_RATIO = 0.6  # eamet time / numpy time
TARGET_PEAK_MIB = 350.0  # eamet peak RSS above the inputs
TOLERANCE = 1e-3


# -------------------------------------------------------------------------------------------- data


def make_inputs(n: int, d: int, seed: int = 0, clusters: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(keys, residuals), both (n, d) float32 C-contiguous; see the module docstring."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    permutation = rng.permutation(d)
    signs = rng.choice(np.array([-0.5, 0.5], dtype=np.float32), d)  # 0.5 · signed permutation
    noise_scale = rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    keys = np.empty((n, d), dtype=np.float32)
    residuals = np.empty((n, d), dtype=np.float32)
    step = 4096  # generate in slabs so that building the inputs needs little beyond the inputs
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        k, r = keys[rows], residuals[rows]
        k[...] = rng.standard_normal(k.shape, dtype=np.float32)
        k *= 0.6
        k += centres[labels[rows]]
        np.multiply(k[:, permutation], signs, out=r)
        r += noise_scale[rows] * rng.standard_normal(r.shape, dtype=np.float32)
    return keys, residuals


# ------------------------------------------------------------------------------------- references


def numpy_rows(
    sk: np.ndarray, sr: np.ndarray, row_ids: np.ndarray, tau: float, m: int
) -> dict[str, np.ndarray]:
    """The outputs for a block of rows, given their key and residual cosines to all N rows.

    ``sk``, ``sr``: (h, N) float32, row i of the block is global row ``row_ids[i]``; overwritten.
    """
    h = sk.shape[0]
    self_pairs = (np.arange(h), row_ids)
    sk[self_pairs] = -np.inf
    sr[self_pairs] = -np.inf
    # Top-M neighbours by cosine, best first, and the cosines the MSE needs.
    key_nb = np.argpartition(sk, -m, axis=1)[:, -m:]
    key_cos = np.take_along_axis(sk, key_nb, axis=1)
    order = np.argsort(-key_cos, axis=1, kind="stable")
    key_nb = np.take_along_axis(key_nb, order, axis=1)
    key_cos = np.take_along_axis(key_cos, order, axis=1).astype(np.float64)
    res_cos = np.take_along_axis(sr, key_nb, axis=1).astype(np.float64)
    res_nb = np.argpartition(sr, -m, axis=1)[:, -m:]
    overlap = (key_nb[:, :, None] == res_nb[:, None, :]).sum(axis=(1, 2)) / m
    weights = np.exp((key_cos - key_cos[:, :1]) / tau)
    mse = (weights * (key_cos - res_cos) ** 2).sum(axis=1) / weights.sum(axis=1)
    # log-softmax(S / tau) per row, in place; exp(-inf) = 0 drops the diagonal.
    for s in (sk, sr):
        s *= 1.0 / tau
        s -= s.max(axis=1, keepdims=True)
        s -= np.log(np.exp(s).sum(axis=1, keepdims=True))
    # KL(P_r || P_k) = sum_j P_r (log P_r - log P_k); the diagonal (-inf - -inf) contributes nothing.
    with np.errstate(invalid="ignore"):
        np.subtract(sr, sk, out=sk)
    sk[self_pairs] = 0.0
    np.exp(sr, out=sr)
    sr *= sk
    scores = sr.sum(axis=1, dtype=np.float64)
    return {"scores": scores, "overlap": overlap, "topm_mse": mse}


def numpy_cosines(x: np.ndarray) -> np.ndarray:
    """The N×N float32 cosine matrix of the rows of ``x``."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit @ unit.T


def numpy_reference(keys: np.ndarray, residuals: np.ndarray, tau: float, m: int) -> dict[str, np.ndarray]:
    """Full-matrix numpy: both N×N cosine matrices in memory, reduced in blocks of rows."""
    n = keys.shape[0]
    s_k, s_r = numpy_cosines(keys), numpy_cosines(residuals)
    parts = []
    for start in range(0, n, REFERENCE_BLOCK):
        rows = slice(start, min(n, start + REFERENCE_BLOCK))
        parts.append(numpy_rows(s_k[rows], s_r[rows], np.arange(rows.start, rows.stop), tau, m))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def torch_reference(
    torch: Any, keys: np.ndarray, residuals: np.ndarray, tau: float, m: int
) -> dict[str, np.ndarray]:
    """The same as :func:`numpy_reference` in torch on the CPU."""
    n = keys.shape[0]

    def cosines(x: np.ndarray) -> Any:
        unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
        return unit @ unit.T

    s_k, s_r = cosines(keys), cosines(residuals)
    out: dict[str, list[Any]] = {"scores": [], "overlap": [], "topm_mse": []}
    for start in range(0, n, REFERENCE_BLOCK):
        sk, sr = s_k[start : start + REFERENCE_BLOCK], s_r[start : start + REFERENCE_BLOCK]
        h = sk.shape[0]
        self_pairs = (torch.arange(h), torch.arange(start, start + h))
        sk[self_pairs] = -torch.inf
        sr[self_pairs] = -torch.inf
        key_cos, key_nb = torch.topk(sk, m, dim=1)  # sorted, best first
        key_cos = key_cos.double()
        res_cos = sr.gather(1, key_nb).double()
        res_nb = torch.topk(sr, m, dim=1).indices
        out["overlap"].append((key_nb[:, :, None] == res_nb[:, None, :]).sum(dim=(1, 2)) / m)
        weights = torch.exp((key_cos - key_cos[:, :1]) / tau)
        out["topm_mse"].append((weights * (key_cos - res_cos) ** 2).sum(dim=1) / weights.sum(dim=1))
        for s in (sk, sr):
            s.mul_(1.0 / tau)
            s.sub_(torch.logsumexp(s, dim=1, keepdim=True))
        sk.neg_().add_(sr)  # log P_r - log P_k
        sk[self_pairs] = 0.0
        out["scores"].append(sr.exp_().mul_(sk).sum(dim=1, dtype=torch.float64))
    return {name: torch.cat(parts).double().numpy() for name, parts in out.items()}


# ---------------------------------------------------------------------------------------- workers


def worker(
    method: str, n: int, d: int, repeats: int, threads: int, eamet_threads: int
) -> tuple[Measurement, dict[str, np.ndarray]]:
    """Runs in a fresh process: builds the inputs, then times ``method`` and reads its peak RSS."""
    keys, residuals = make_inputs(n, d)
    if method == "numpy":

        def run() -> dict[str, np.ndarray]:
            return numpy_reference(keys, residuals, TAU, TOP_M)

        used = threads
    elif method == "torch":
        torch = set_torch_threads(threads)
        used = torch.get_num_threads()

        def run() -> dict[str, np.ndarray]:
            return torch_reference(torch, keys, residuals, TAU, TOP_M)

    else:
        import eamet

        used = set_eamet_threads(eamet_threads)

        def run() -> dict[str, np.ndarray]:
            report = eamet.misalignment(
                keys, residuals, tau=TAU, top_m=TOP_M, progressive=False, progress=False
            )
            return {"scores": report.scores, "overlap": report.overlap, "topm_mse": report.topm_mse}

    measurement, result = measure(run, repeats)
    measurement.extra["threads"] = used
    return measurement, result


# ----------------------------------------------------------------------------------------- report


def agreement(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far ``other``'s outputs are from the numpy reference's, and whether within TOLERANCE."""
    total_ref = float(ref["scores"].sum())
    out = {
        "total": float(other["scores"].sum()),
        "total_rel_diff": abs(float(other["scores"].sum()) - total_ref) / abs(total_ref),
        "max_row_diff_over_mean": float(np.abs(other["scores"] - ref["scores"]).max() / ref["scores"].mean()),
        "overlap_mean": float(other["overlap"].mean()),
        "overlap_mean_diff": abs(float(other["overlap"].mean() - ref["overlap"].mean())),
        "mse_mean_rel_diff": abs(float(other["topm_mse"].mean() / ref["topm_mse"].mean()) - 1.0),
    }
    keys = ("total_rel_diff", "overlap_mean_diff", "mse_mean_rel_diff")
    out["ok"] = all(out[k] <= TOLERANCE for k in keys)
    return out


def print_times(results: list[dict[str, Any]]) -> None:
    median = {(r["n"], r["d"], r["method"]): r["measurement"].median_s for r in results}
    rows = []
    for r in results:
        m: Measurement = r["measurement"]
        n, d = r["n"], r["d"]
        rows.append([
            n, d, r["method"], m.extra["threads"], m.median_s, " ".join(f"{t:.3f}" for t in m.times_s),
            m.median_s / median[(n, d, "numpy")], m.median_s / median.get((n, d, "torch"), float("nan")),
            m.peak_above_inputs_mib, m.peak_rss_mib, 2 * n * d * 4 / MIB,
        ])  # fmt: skip
    headers = ["N", "d", "method", "threads", "median s", "all runs s", "time / numpy", "time / torch"]
    headers += ["peak above inputs MiB", "peak RSS MiB", "inputs MiB"]
    print("## Time and memory\n")
    print(markdown_table(headers, rows))
    note = rss_note([r["measurement"] for r in results])
    if note:
        print(f"\n{note}")


def print_agreement(results: list[dict[str, Any]]) -> bool:
    print("\n## Agreement with the numpy reference\n")
    rows = []
    for r in results:
        a = r.get("agreement")
        if a:
            rows.append([
                r["n"], r["d"], r["method"], f"{a['total']:.7g}", a["total_rel_diff"],
                a["max_row_diff_over_mean"], a["overlap_mean"], a["overlap_mean_diff"],
                a["mse_mean_rel_diff"], pass_fail(a["ok"]),
            ])  # fmt: skip
    headers = ["N", "d", "method", "total score", "rel. diff total", "max row Δ / mean score"]
    headers += ["overlap mean", "Δ overlap mean", "rel. diff MSE mean", f"within {TOLERANCE:g}"]
    print(markdown_table(headers, rows))
    print("\nnumpy reference:")
    for r in results:
        if r["method"] == "numpy":
            print(f"- N={r['n']} d={r['d']}: total {r['total']:.6g}, overlap mean {r['overlap_mean']:.4f}")
    return all(r["agreement"]["ok"] for r in results if "agreement" in r)


def print_targets(results: list[dict[str, Any]]) -> None:
    print(f"\n## Targets (N = {TARGET_SIZE[0]}, d = {TARGET_SIZE[1]})\n")
    found = {r["method"]: r["measurement"] for r in results if (r["n"], r["d"]) == TARGET_SIZE}
    if "eamet" not in found or "numpy" not in found:
        print("not measured in this run (needs --n 10000 --d 1024 and the methods eamet and numpy)")
        return
    ratio = found["eamet"].median_s / found["numpy"].median_s
    peak = found["eamet"].peak_above_inputs_mib
    time_target = f"eamet time <= {TARGET_TIME_RATIO} × numpy"
    peak_target = f"eamet peak RSS above inputs <= {TARGET_PEAK_MIB:g} MiB"
    rows = [
        [time_target, f"{ratio:.3f} ×", pass_fail(ratio <= TARGET_TIME_RATIO)],
        [peak_target, f"{peak:.1f} MiB", pass_fail(peak <= TARGET_PEAK_MIB)],
    ]
    print(markdown_table(["target", "measured", "result"], rows))


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 10_000], help="rows (default %(default)s)")
    parser.add_argument("--d", type=int, nargs="+", default=[1024, 4096], help="widths (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (default %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    if args.quick:
        args.n, args.d, args.repeats = [1000, 2000], [256, 1024], 1
    if "numpy" not in args.methods:
        parser.error("--methods must include numpy, the reference of the agreement check")
    args.methods = [m for m in METHODS if m in args.methods]  # numpy first: the others compare to it
    configure_threads(args.threads)
    info = machine_info(args.threads, args.eamet_threads, with_torch="torch" in args.methods)
    print_header("eamet.misalignment vs full-matrix numpy and torch references", info)
    print(
        f"tau = {TAU}, top_m = {TOP_M}, float32 inputs, {args.repeats} timed call(s) per method "
        "(median reported), each method in its own process\n"
    )

    results: list[dict[str, Any]] = []
    for n in args.n:
        for d in args.d:
            outputs = {}
            for method in args.methods:
                measurement, outputs[method] = run_isolated(
                    worker, method, n, d, args.repeats, args.threads, args.eamet_threads
                )
                print(f"  measured {method:5s} N={n} d={d}: {measurement.median_s:.3f} s", file=sys.stderr)
                row = {"n": n, "d": d, "method": method, "measurement": measurement}
                row["total"] = float(outputs[method]["scores"].sum())
                row["overlap_mean"] = float(outputs[method]["overlap"].mean())
                if method != "numpy":
                    row["agreement"] = agreement(outputs["numpy"], outputs[method])
                results.append(row)

    print_times(results)
    all_agree = print_agreement(results)
    print_targets(results)
    save_json(args.json, {"machine": info, "args": vars(args) | {"json": str(args.json)}, "results": results})
    if not all_agree:
        print("\n**the methods disagree beyond the tolerance: the timings compare different computations**")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
