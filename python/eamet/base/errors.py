"""Exceptions raised by eamet, from Python and from the Rust core alike.

Every error eamet raises on purpose derives from :class:`EametError` and also from the built-in class a
caller would naturally catch (``ValueError`` for bad values, ``TypeError`` for bad types). Errors about
one argument carry it in ``argument``; errors about one row of an array carry ``row`` (0-based);
errors about a file carry ``path``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CacheError",
    "CorpusError",
    "DTypeError",
    "DatasetError",
    "EametError",
    "EditMismatchError",
    "EmptyError",
    "FactError",
    "MissingDependencyError",
    "NonFiniteError",
    "NotLandedWarning",
    "ParameterError",
    "ShapeError",
    "SolveError",
    "StorageError",
    "UnsupportedArchitectureError",
    "ZeroNormError",
]


class EametError(Exception):
    """Base class of every error eamet raises on purpose.

    Attributes:
        argument: name of the offending argument (``"keys"``, ``"tau"`` ...), or ``None``.
        row: 0-based index of the first offending row, or ``None``.
        path: the file concerned, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        argument: str | None = None,
        row: int | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.argument = argument
        self.row = row
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the keyword attributes through pickling (multiprocessing, DataLoader workers). They are
        # listed explicitly because ImportError keeps `path` in a slot, outside __dict__.
        state = {**self.__dict__, "argument": self.argument, "row": self.row, "path": self.path}
        return (self.__class__, self.args, state)


class ShapeError(EametError, ValueError):
    """An array has the wrong number of dimensions, rows or columns."""


class EmptyError(ShapeError):
    """An array, or an accumulator, holds nothing."""


class DTypeError(EametError, TypeError):
    """An array has an element type eamet cannot use (integers, booleans, complex, objects)."""


class NonFiniteError(EametError, ValueError):
    """An array holds NaN or infinity; ``row`` is the first row that does."""


class ZeroNormError(EametError, ValueError):
    """A row has zero norm, so its cosine similarity is undefined; ``row`` names it."""


class ParameterError(EametError, ValueError):
    """A scalar argument is out of range (``tau <= 0``, ``top_m < 1`` ...)."""


class CacheError(EametError, ValueError):
    """A saved file is truncated, corrupt, or not the kind of file expected; ``path`` names it."""


class MissingDependencyError(EametError, ImportError):
    """An optional dependency (an extra such as ``eamet[plot]``) is needed but not installed."""


class FactError(EametError, ValueError):
    """A fact (edit request) is malformed, duplicated or conflicting; ``row`` is its 0-based index."""


class UnsupportedArchitectureError(EametError, ValueError):
    """The model's ``config.model_type`` is not in the architecture registry, or its modules do not match
    the registered entry. Register it with :func:`eamet.register_arch`.
    """


class EditMismatchError(EametError, ValueError):
    """An edit cannot be applied or undone on this model: its architecture, shapes or weights differ from
    the ones the edit was made on.
    """


class CorpusError(EametError, ValueError):
    """The text corpus for the covariance statistics cannot be read or holds no usable text."""


class DatasetError(EametError, ValueError):
    """An evaluation dataset file is missing, unreadable, not JSON, or not a list of records; ``path`` names
    it (a record that cannot be read is a :class:`FactError` with its ``row``).
    """


class SolveError(EametError, ArithmeticError):
    """The update's linear system λC + KKᵀ is not positive definite (λ = 0 with fewer facts than key
    dimensions, or a degenerate covariance); ``argument`` names the layer setting to raise.
    """


class StorageError(EametError, OSError):
    """A file eamet writes (an edit, statistics, a store entry) could not be written — full disk, no
    permission; ``path`` names it. Nothing partial is left behind: files are written atomically."""


class NotLandedWarning(UserWarning):
    """An edit finished, but some of its facts did not land: after the update the model does not give
    their target greedily at the bare prompt (``EditResult.outcomes`` says which)."""
