"""The GIL is released during long kernels (proven by timing a spinning main thread, in the spirit of
safetensors' test_threadable.py), the kernels work in a forked child, and progress callbacks report."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import pytest

import eamet
from eamet import _core
from eamet.base.errors import ParameterError
from eamet.kernels.diagnostics import kernel_threads


def largest_main_thread_stall(work: Callable[[], object]) -> tuple[float, float]:
    """Runs ``work`` in a background thread while this thread records time.perf_counter() in a loop.

    Returns (duration of ``work``, the largest gap between two consecutive main-thread iterations that
    overlaps the call). If ``work`` held the GIL, this thread could not iterate and the gap would be
    about the whole call.
    """
    span: dict[str, float] = {}
    failure: list[BaseException] = []
    done = threading.Event()

    def worker() -> None:
        try:
            span["start"] = time.perf_counter()
            work()
            span["end"] = time.perf_counter()
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)
        finally:
            done.set()

    stamps = [time.perf_counter()]
    thread = threading.Thread(target=worker)
    thread.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
    stamps.append(time.perf_counter())
    thread.join()
    if failure:
        raise failure[0]
    start, end = span["start"], span["end"]
    t = np.asarray(stamps)
    gaps = np.diff(t)
    inside = (t[1:] > start) & (t[:-1] < end)  # intervals that overlap the call
    return end - start, float(gaps[inside].max())


def sized_to_take(
    seconds: float, make: Callable[[int], Callable[[], object]], size: int, power: float
) -> int:
    """Grows ``size`` until one run of ``make(size)`` takes ``seconds`` (cost ~ size**power), so the
    test holds on faster and slower machines alike."""
    for _ in range(4):
        work = make(size)  # building the inputs is not part of the call being sized
        t0 = time.perf_counter()
        work()
        took = time.perf_counter() - t0
        if took >= seconds:
            break
        size = int(size * min(4.0, (1.3 * seconds / max(took, 1e-3)) ** (1 / power))) + 1
    return size


@pytest.mark.parametrize("kernel", ["misalignment", "neighbors"])
def test_kernels_release_the_gil(restore_threads: None, kernel: str) -> None:
    """While misalignment / neighbors run (>= 0.2 s), another Python thread keeps running: its longest
    stall is a small fraction of the call."""
    eamet.set_num_threads(1)
    rng = np.random.default_rng(0)

    def make(n: int) -> Callable[[], object]:
        keys = rng.normal(size=(n, 256)).astype(np.float32)
        residuals = rng.normal(size=(n, 256)).astype(np.float32)
        if kernel == "neighbors":
            return lambda: eamet.neighbors(keys, 50, progress=False)
        return lambda: eamet.misalignment(keys, residuals, progress=False)

    n = sized_to_take(0.4, make, 3000, power=2)
    duration, stall = largest_main_thread_stall(make(n))
    assert duration >= 0.2, f"the call took only {duration:.3f} s; the test proves nothing"
    assert stall < 0.25 * duration, f"main thread stalled {stall:.3f} s during a {duration:.3f} s call"


def test_second_moment_update_releases_the_gil(restore_threads: None) -> None:
    """SecondMoment.update releases the GIL for the whole product."""
    eamet.set_num_threads(1)
    rng = np.random.default_rng(1)
    dim = 1024

    def make(rows: int) -> Callable[[], object]:
        acc = eamet.SecondMoment(dim)
        batch = rng.normal(size=(rows, dim))
        return lambda: acc.update(batch)

    rows = sized_to_take(0.4, make, 1024, power=1)
    duration, stall = largest_main_thread_stall(make(rows))
    assert duration >= 0.2, f"the call took only {duration:.3f} s; the test proves nothing"
    assert stall < 0.25 * duration, f"main thread stalled {stall:.3f} s during a {duration:.3f} s call"


def test_kernels_work_in_a_forked_child(restore_threads: None) -> None:
    """After the parent used the kernels (its thread pool is running), a fork()ed child builds its own
    pool: misalignment and SecondMoment.update complete there with the parent's results."""
    eamet.set_num_threads(2)
    rng = np.random.default_rng(2)
    keys, residuals = rng.normal(size=(300, 16)), rng.normal(size=(300, 12))
    batch = rng.normal(size=(500, 64))
    # Fixed tiles and one thread in the child: same cosines, so the child's result is exact.
    expected = _core.misalignment(keys, residuals, tau=0.07, top_m=10, progressive=False, block=64)
    acc = eamet.SecondMoment(64)
    acc.update(batch)
    expected_moment = acc.moment()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: fork with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which must never return into pytest
        code = 1
        try:
            eamet.set_num_threads(2)
            got = _core.misalignment(keys, residuals, tau=0.07, top_m=10, progressive=False, block=64)
            child_acc = eamet.SecondMoment(64)
            child_acc.update(batch)
            rep = eamet.misalignment(keys, residuals, top_m=10, progress=False)
            same = (
                np.array_equal(got["key_neighbors"], expected["key_neighbors"])
                and np.allclose(got["scores"], expected["scores"], rtol=1e-6, atol=1e-6)
                and rep.total == pytest.approx(float(expected["scores"].sum()), rel=1e-5)
                and np.array_equal(child_acc.moment(), expected_moment)
            )
            code = 0 if same else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung (the kernels deadlocked after fork)")
        time.sleep(0.05)
    assert os.WIFEXITED(status), f"child died: status {status}"
    assert os.WEXITSTATUS(status) == 0, "child failed (1: exception, 2: wrong result)"
    # and the parent's pool still works
    again = _core.misalignment(keys, residuals, tau=0.07, top_m=10, progressive=False, block=64)
    np.testing.assert_array_equal(again["key_neighbors"], expected["key_neighbors"])


@pytest.mark.parametrize("progressive", [False, True])
def test_progress_callback_ends_at_total(progressive: bool) -> None:
    """The core calls progress(done, total) with done never decreasing and never above total, ending
    with (total, total), total being the number of tiles."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 8))
    calls: list[tuple[int, int]] = []
    _core.misalignment(
        x,
        x[::-1],
        tau=0.07,
        top_m=5,
        progressive=progressive,
        block=16,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls, "progress was never called"
    total = calls[-1][1]
    assert calls[-1] == (total, total)
    assert total > 0
    done = [d for d, _ in calls]
    assert done == sorted(done) and all(0 <= d <= t for d, t in calls)
    calls.clear()
    _core.neighbors(x, 5, block=16, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] > 0


def test_progress_callback_is_called_during_a_long_run(restore_threads: None) -> None:
    """During a run longer than the 100 ms polling interval the callback sees intermediate counts."""
    eamet.set_num_threads(1)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4000, 128)).astype(np.float32)
    calls: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    _core.misalignment(
        x, x, tau=0.07, top_m=10, progressive=False, block=64, progress=lambda d, t: calls.append((d, t))
    )
    took = time.perf_counter() - t0
    total = calls[-1][1]
    assert calls[-1] == (total, total)
    if took > 0.35:  # several 100 ms polls happened
        assert any(d < total for d, _ in calls[:-1]), calls


def test_exception_in_progress_callback_cancels_and_propagates() -> None:
    """An exception raised by the progress callback stops the kernel and reaches the caller."""

    def boom(done: int, total: int) -> None:
        raise RuntimeError(f"stop at {done}/{total}")

    x = np.random.default_rng(5).normal(size=(60, 4))
    with pytest.raises(RuntimeError, match="stop at"):
        _core.misalignment(x, x, tau=0.07, top_m=3, progressive=False, progress=boom)
    with pytest.raises(RuntimeError, match="stop at"):
        _core.neighbors(x, 3, progress=boom)
    # the pool is still usable afterwards
    assert eamet.misalignment(x, x, top_m=3).total == pytest.approx(0.0, abs=1e-9)


def test_public_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True drives a tqdm bar on stderr and gives the same report as progress=False."""
    x = np.random.default_rng(6).normal(size=(80, 5))
    shown = eamet.misalignment(x, x[::-1], top_m=4, progress=True)
    hidden = eamet.misalignment(x, x[::-1], top_m=4, progress=False)
    np.testing.assert_array_equal(shown.key_neighbors, hidden.key_neighbors)
    np.testing.assert_allclose(shown.scores, hidden.scores, rtol=1e-6, atol=1e-9)
    assert "misalignment" in capsys.readouterr().err


def test_concurrent_calls_from_several_python_threads() -> None:
    """Several Python threads may call the kernels at once (they share the core's pool): each gets the
    result it would get alone."""
    rng = np.random.default_rng(7)
    problems = [(rng.normal(size=(400, 16)), rng.normal(size=(400, 8))) for _ in range(4)]
    alone = [_core.misalignment(k, r, tau=0.07, top_m=8, progressive=False, block=64) for k, r in problems]
    moments = [np.asarray(k.T @ k / 400) for k, _ in problems]
    results: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            k, r = problems[i]
            for _ in range(3):
                raw = _core.misalignment(k, r, tau=0.07, top_m=8, progressive=False, block=64)
                acc = eamet.SecondMoment(16)
                acc.update(k)
            results[i] = (raw, acc.moment())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    for i in range(4):
        raw, moment = results[i]
        np.testing.assert_array_equal(raw["key_neighbors"], alone[i]["key_neighbors"])
        np.testing.assert_array_equal(raw["overlap"], alone[i]["overlap"])
        # same cosines; only the thread-order rounding of the float64 sums differs
        np.testing.assert_allclose(raw["scores"], alone[i]["scores"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(moment, moments[i], rtol=1e-12, atol=1e-12)


class InterruptedByTestError(Exception):
    """Raised by the test's signal handler."""


def test_signal_handler_exception_cancels_a_long_kernel(restore_threads: None) -> None:
    """The waiting thread runs Python signal handlers every 100 ms: an exception from one (as Ctrl-C's
    KeyboardInterrupt) stops the kernel between tiles and propagates well before the call would end."""
    eamet.set_num_threads(1)
    rng = np.random.default_rng(8)
    small = rng.normal(size=(3000, 128)).astype(np.float32)
    t0 = time.perf_counter()
    eamet.misalignment(small, small, progress=False)
    per_call = time.perf_counter() - t0
    n = int(3000 * np.sqrt(3.0 / max(per_call, 1e-3)))  # a call of about 3 s
    x = rng.normal(size=(n, 128)).astype(np.float32)

    def handler(signum: int, frame: object) -> None:
        raise InterruptedByTestError

    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(InterruptedByTestError):
            eamet.misalignment(x, x, progress=False)
        took = time.perf_counter() - t0
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert took < 1.5, f"the kernel ran {took:.2f} s after a signal sent at 0.3 s"
    # the pool is usable afterwards
    rep = eamet.misalignment(small[:100], small[:100], top_m=3)
    assert rep.total < 1e-6


def test_kernel_threads_sets_and_restores_the_count(restore_threads: None) -> None:
    """kernel_threads(n) runs its block on n kernel threads and restores the count after it, also when
    the block raises; None leaves the count alone; a negative n is a ParameterError naming ``n``."""
    eamet.set_num_threads(3)
    with kernel_threads(1):
        assert eamet.get_num_threads() == 1
    assert eamet.get_num_threads() == 3
    with pytest.raises(RuntimeError, match="inside"), kernel_threads(2):
        assert eamet.get_num_threads() == 2
        raise RuntimeError("inside")
    assert eamet.get_num_threads() == 3
    with kernel_threads(None):
        assert eamet.get_num_threads() == 3
    with pytest.raises(ParameterError) as info, kernel_threads(-1):
        pass
    assert info.value.argument == "n"
    assert eamet.get_num_threads() == 3
