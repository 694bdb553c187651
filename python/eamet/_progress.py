"""Progress bars for long kernels: a tqdm bar fed by the core's ``(done, total)`` callback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_callback"]


@contextmanager
def progress_callback(enabled: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """Yields a ``callback(done, total)`` that drives a tqdm bar, or ``None`` when disabled."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=description, unit="tile", leave=False, dynamic_ncols=True)

    def callback(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield callback
    finally:
        bar.close()
