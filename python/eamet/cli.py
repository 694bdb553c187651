"""The ``eamet`` command line.

Every command has ``--help``; failures print one line, ``eamet: error: ...``, to stderr and exit 1
(2 for usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eamet import _core
from eamet.diagnostics import DEFAULT_TAU, DEFAULT_TOP_M, MisalignmentReport, misalignment
from eamet.errors import EametError

__all__ = ["main"]


def _load_matrix(path: str) -> np.ndarray:
    # Memory-mapped: the core reads float32/float64 files in place, so only its normalised copy is made.
    loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise EametError(f"{path}: expected a .npy file holding one array, got an .npz archive", path=path)
    return np.asarray(loaded)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _format_report(report: MisalignmentReport, worst: int, widths: tuple[int, int]) -> str:
    support = "j < i (progressive)" if report.progressive else "j != i"
    q = report.quantiles()
    lines = [
        f"facts N = {len(report)}   key dim = {widths[0]}   residual dim = {widths[1]}   "
        f"tau = {report.tau:g}   M = {report.top_m}   support {support}",
        "misalignment A(i) = KL(P_r(i) || P_k(i))",
        f"  total      {report.total:.6g}",
        f"  mean       {report.mean:.6g}",
        "  quantiles  " + "  ".join(f"{k} {v:.4g}" for k, v in q.items()),
        f"  reverse KL(P_k || P_r) total {float(report.reverse_scores.sum()):.6g}",
        f"top-{report.top_m} neighbour overlap  mean {float(report.overlap.mean()):.4f}",
        f"top-{report.top_m} weighted MSE       mean {float(report.topm_mse.mean()):.4g}",
    ]
    rows = report.worst(worst)
    if rows:
        lines.append(f"worst {len(rows)} facts:")
        lines.append(f"  {'row':>8}  {'A(i)':>12}  {'overlap':>8}  {'top-M MSE':>10}")
        for i in rows:
            lines.append(
                f"  {i:>8}  {report.scores[i]:>12.6g}  {report.overlap[i]:>8.3f}  {report.topm_mse[i]:>10.4g}"
            )
    return "\n".join(lines)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    keys = _load_matrix(args.keys)
    residuals = _load_matrix(args.residuals)
    threads_before = _core.get_num_threads()
    if args.threads is not None:
        _core.set_num_threads(args.threads)
    try:
        report = misalignment(
            keys,
            residuals,
            tau=args.tau,
            top_m=args.top_m,
            progressive=args.progressive,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    finally:
        _core.set_num_threads(threads_before)
    widths = (keys.shape[1], residuals.shape[1])
    print(_format_report(report, args.worst, widths))
    if args.json:
        payload: dict[str, Any] = {
            "command": "diagnose",
            "keys": str(args.keys),
            "residuals": str(args.residuals),
            **report.to_dict(worst=args.worst),
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``eamet`` command."""
    parser = argparse.ArgumentParser(
        prog="eamet",
        description="Massive knowledge editing of Hugging Face causal LMs (EAMET, MEMIT) and diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"eamet {_core.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    diagnose = commands.add_parser(
        "diagnose",
        help="score the embedding misalignment of keys vs residuals (.npy files)",
        description=(
            "Per-fact misalignment A(i) = KL(P_r(i) || P_k(i)) of residual vs key cosine "
            "neighbourhoods, with top-M overlap and weighted MSE. Row i of both files is fact i."
        ),
    )
    diagnose.add_argument("keys", help="(N, d_k) float array in .npy format")
    diagnose.add_argument("residuals", help="(N, d_r) float array in .npy format")
    diagnose.add_argument(
        "--tau", type=_positive_float, default=DEFAULT_TAU, help="softmax temperature (default %(default)s)"
    )
    diagnose.add_argument(
        "--top-m", type=_positive_int, default=DEFAULT_TOP_M, help="neighbours per fact (default %(default)s)"
    )
    diagnose.add_argument(
        "--progressive",
        action="store_true",
        help="support j < i (EAMET's optimisation order) instead of j != i",
    )
    diagnose.add_argument(
        "--worst", type=_non_negative_int, default=10, help="worst facts to list (default %(default)s)"
    )
    diagnose.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    diagnose.add_argument("--plot", metavar="OUT.png", help="also draw the report (needs eamet[plot])")
    diagnose.add_argument(
        "--threads", type=_positive_int, help="kernel threads (default: EAMET_NUM_THREADS or all CPUs)"
    )
    diagnose.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (shown only on a terminal)"
    )
    diagnose.set_defaults(run=_cmd_diagnose)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eamet`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("eamet: interrupted", file=sys.stderr)
        return 130
    except (EametError, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"eamet: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
