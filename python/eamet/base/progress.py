"""Progress bars: every bar eamet shows is made here (tqdm), so they all look and behave alike.

:func:`progress_bar` is a bar over work the caller counts; :func:`progress_callback` is a bar fed by the
Rust core's ``(done, total)`` callback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_bar", "progress_callback", "progress_note"]


def progress_note(text: str, enabled: bool = True) -> None:
    """One line of context printed above the bars (stderr, through tqdm so a running bar is not torn)."""
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


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


class _NoBar:
    """What :func:`progress_bar` yields when disabled: the calls a bar takes, doing nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def progress_bar(
    *,
    total: int | None,
    desc: str,
    unit: str,
    enabled: bool = True,
    leave: bool = True,
    bar_format: str | None = None,
) -> Iterator[Any]:
    """A tqdm bar over ``total`` units (``update(n)``, ``set_postfix(...)``), closed on exit; a do-nothing
    stand-in when ``enabled`` is false. ``bar_format``: tqdm's, for bars fed fractional updates."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, bar_format=bar_format)
    try:
        yield bar
    finally:
        bar.close()
