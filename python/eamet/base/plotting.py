"""What every figure of a report needs: matplotlib's ``Figure`` class, or a ``MissingDependencyError``
saying what to install. Each report's figure lives beside the report."""

from __future__ import annotations

from typing import Any

from eamet.base.errors import MissingDependencyError

__all__ = ["figure_class"]


def figure_class() -> Any:
    """matplotlib's ``Figure``, or ``MissingDependencyError`` saying what to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "plotting needs matplotlib: pip install 'eamet[plot]'", argument="plot"
        ) from exc
    return Figure
