"""Progress bars for long kernels: a tqdm bar fed by the core's ``(done, total)`` callback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_callback"]


@contextmanager
def progress_callback(
    enabled: bool, description: str, unit: str = "tile"
) -> Iterator[Callable[[int, int], None] | None]:
    """Yields a ``callback(done, total)`` that drives a tqdm bar counting ``unit``, or ``None`` when disabled.

    The bar is created on the first report (the core reports after 100 ms of work), so quick calls and
    calls that fail validation print nothing.
    """
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bars: list[Any] = []

    def callback(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total or None, desc=description, unit=unit, leave=False))
        bar = bars[0]
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield callback
    finally:
        for bar in bars:
            bar.close()
