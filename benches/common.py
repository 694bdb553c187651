"""Shared harness of the Python benchmarks: thread settings, isolated runs, timing, peak RSS, machine
information, markdown tables, the command-line echo and JSON output.

Every measurement runs in a fresh interpreter (``run_isolated``), so that one method's allocations,
thread pools or caches never affect another's, and so that the peak RSS of a method can be read from
the kernel (``/proc/self/status``) after resetting the high-water mark to the size of the inputs.

numpy and torch are imported lazily here: thread variables must be in the environment before a
child process imports them (``configure_threads`` sets them in this process, children inherit them).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
BUSY_WARNING = 0.10  # fraction of the CPUs busy with other work at start above which a warning is printed
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------- arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    """Options every script has: --quick, --threads, --eamet-threads, --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke test")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of numpy/OpenBLAS and torch (default %(default)s)"
    )
    parser.add_argument(
        "--eamet-threads",
        type=int,
        default=0,
        help="threads of eamet's own pool; 0 keeps eamet's default, EAMET_NUM_THREADS or all CPUs "
        "(default %(default)s)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the raw numbers here")
    return parser


def configure_threads(threads: int) -> None:
    """Puts the BLAS/OpenMP thread variables into the environment that child processes inherit."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def set_eamet_threads(n: int) -> int:
    """In a child: applies ``--eamet-threads`` (0 = eamet's default); returns the pool size in use."""
    import eamet

    if n > 0:
        eamet.set_num_threads(n)
    return eamet.get_num_threads()


def set_torch_threads(n: int) -> Any:
    """In a child: imports torch with ``n`` intra-op threads; returns the module."""
    import torch

    torch.set_num_threads(n)
    return torch


def command_line() -> str:
    """The command that started this process, for the report."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


# ---------------------------------------------------------------------------------- isolated runs


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn(*args)`` in a freshly spawned interpreter and returns its (picklable) result.

    The child inherits this process's environment (thread variables) and ``sys.path``; ``fn`` must be
    a module-level function of the calling script (spawn re-imports it as ``__mp_main__``).
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# -------------------------------------------------------------------------------------- peak RSS


def _status_kib(field_name: str) -> int:
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def rss_mib() -> float:
    """Current resident set size (VmRSS) in MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak resident set size since start or the last reset (VmHWM) in MiB."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current VmRSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``).

    Returns whether the reset demonstrably worked: after a first reset, a 64 MiB buffer is touched and
    freed, so that the high-water mark sits above the current RSS, and a second reset must bring it
    back down.
    """
    import numpy as np

    clear_refs = Path("/proc/self/clear_refs")
    try:
        clear_refs.write_text("5")
    except OSError:
        return False
    probe = np.full(8 * MIB, 1.0)  # 64 MiB of float64, every page touched; freed by munmap
    del probe
    clear_refs.write_text("5")
    return peak_rss_mib() <= rss_mib() + 8


@dataclass
class Measurement:
    """Times of the repeats of one method and its memory, as measured in its own process."""

    times_s: list[float]
    baseline_rss_mib: float  # VmRSS with interpreter, libraries and inputs, before the first repeat
    peak_rss_mib: float  # VmHWM after the repeats
    reset_ok: bool  # False: the high-water mark could not be reset; peak_above is an upper bound
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def peak_above_inputs_mib(self) -> float:
        return self.peak_rss_mib - self.baseline_rss_mib

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_s"] = self.median_s
        out["peak_above_inputs_mib"] = self.peak_above_inputs_mib
        return out


def measure(run: Callable[[], Any], repeats: int) -> tuple[Measurement, Any]:
    """Times ``repeats`` calls of ``run`` and the peak RSS they reach above the current RSS.

    Call it in a fresh process after building the inputs and importing what ``run`` needs. Returns
    the measurement and the last call's result.
    """
    gc.collect()
    reset_ok = reset_peak_rss()
    gc.collect()
    baseline = rss_mib()
    times = []
    result = None
    for _ in range(repeats):
        result = None  # the previous result must not count towards the next call's peak
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mib()
    return Measurement(times, baseline, peak, reset_ok), result


def rss_note(measurements: Sequence[Measurement]) -> str | None:
    """A warning line when some high-water mark could not be reset."""
    if all(m.reset_ok for m in measurements):
        return None
    return (
        "note: /proc/self/clear_refs could not reset the RSS high-water mark here; 'above inputs' is "
        "then VmHWM - VmRSS(inputs), an upper bound that includes building the inputs."
    )


# ---------------------------------------------------------------------------------- machine info


def _cpu_model() -> str:
    try:
        with Path("/proc/cpuinfo").open() as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_fraction(interval_s: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval_s`` (other processes: nothing of ours runs meanwhile)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(interval_s)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (busy1 - busy0) / max(total1 - total0, 1)


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (uncommitted changes)" if dirty else "")


def machine_info(threads: int, eamet_threads: int, with_torch: bool = True) -> dict[str, Any]:
    """CPU, cores, load, library versions and the thread settings the children will use."""
    import numpy as np

    import eamet

    blas = "unknown"
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]  # numpy >= 1.26
        blas = f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    except Exception:
        pass
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
        "cpu_busy_at_start": cpu_busy_fraction(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": f"{np.__version__} ({blas})",
        "eamet": f"{eamet.__version__}, git {_git_revision()}",
        "thread_env": {name: os.environ.get(name, "") for name in THREAD_VARIABLES},
        "numpy_torch_threads": threads,
        "eamet_threads": eamet_threads if eamet_threads > 0 else eamet.get_num_threads(),
    }
    if with_torch:
        import torch

        info["torch"] = torch.__version__
    return info


def print_header(title: str, info: dict[str, Any]) -> None:
    print(f"# {title}\n")
    print(f"command: {command_line()}\n")
    print(f"- CPU: {info['cpu']}; {info['logical_cpus']} logical CPUs, {info['usable_cpus']} usable")
    busy = info["cpu_busy_at_start"]
    print(
        f"- at start: CPUs {busy:.0%} busy with other work (over 0.5 s), "
        f"load average {' '.join(info['load_average'])}"
    )
    if busy > BUSY_WARNING:
        print(
            "- **warning**: the machine is not idle; timings are unreliable, and multi-threaded BLAS "
            "(numpy, torch) suffers far more from competing load than eamet's work-stealing pool"
        )
    print(f"- {info['platform']}, Python {info['python']}")
    versions = f"numpy {info['numpy']}"
    if "torch" in info:
        versions += f", torch {info['torch']}"
    print(f"- {versions}, eamet {info['eamet']}")
    env = ", ".join(f"{k}={v}" for k, v in info["thread_env"].items())
    print(
        f"- threads: numpy/torch {info['numpy_torch_threads']} ({env}, torch.set_num_threads); "
        f"eamet pool {info['eamet_threads']}"
    )
    if info["eamet_threads"] != info["numpy_torch_threads"]:
        print("- **warning**: eamet and the baselines use different thread counts")
    print(flush=True)


# ----------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; numbers are right-aligned, everything else left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(row) for row in cells)])


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        magnitude = abs(value)
        if magnitude == 0 or 1e-3 <= magnitude < 10:
            return f"{value:.4g}"
        if 10 <= magnitude < 1e4:
            return f"{value:.1f}"
        if 1e4 <= magnitude < 1e15:
            return f"{value:,.0f}"
        return f"{value:.3e}"
    return str(value)


def pass_fail(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def save_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command_line(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    print(f"\nraw numbers written to {path}")


def _json_default(value: Any) -> Any:
    if isinstance(value, Measurement):
        return value.to_json()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
