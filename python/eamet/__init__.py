"""eamet: massive knowledge editing of Hugging Face causal LMs (EAMET and MEMIT), with a Rust core.

Available now: the model-free embedding-misalignment diagnostic and the second-moment accumulator.

    >>> import numpy as np, eamet
    >>> keys = np.random.default_rng(0).normal(size=(1000, 64))
    >>> report = eamet.misalignment(keys, keys @ np.eye(64) * 3.0)   # residuals aligned with keys
    >>> round(report.total, 6)
    0.0
"""

from eamet import errors
from eamet._core import __version__, get_num_threads, set_num_threads
from eamet.diagnostics import MisalignmentReport, misalignment, neighbors
from eamet.errors import EametError
from eamet.moments import SecondMoment

__all__ = [
    "EametError",
    "MisalignmentReport",
    "SecondMoment",
    "__version__",
    "errors",
    "get_num_threads",
    "misalignment",
    "neighbors",
    "set_num_threads",
]
