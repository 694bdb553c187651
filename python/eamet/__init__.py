"""eamet: massive knowledge editing of Hugging Face causal LMs (EAMET and MEMIT), with a Rust core.

Editing: ``Editor(model, tokenizer).edit(facts)`` (EAMET or MEMIT) returns an undoable, saveable
``EditResult``. Evaluation: ``evaluate(model, tokenizer, load_dataset("counterfact", path))``.
Causal tracing: ``trace(model, tokenizer, known_cases(model, tokenizer, cases))``.
Diagnostics: ``misalignment(keys, residuals)``, importable and runnable without torch (the editing and
evaluation names import torch on first use; ``load_dataset`` needs none).

    >>> import numpy as np, eamet
    >>> keys = np.random.default_rng(0).normal(size=(1000, 64))
    >>> report = eamet.misalignment(keys, keys @ np.eye(64) * 3.0)   # residuals aligned with keys
    >>> round(report.total, 6)
    0.0
"""

from typing import TYPE_CHECKING, Any

from eamet import errors
from eamet.base.arch import ArchSpec, known_architectures, register_arch
from eamet.base.errors import EametError
from eamet.base.facts import Fact
from eamet.base.records import load_dataset
from eamet.base.settings import EditConfig
from eamet.kernels import __version__, get_num_threads, set_num_threads
from eamet.kernels.diagnostics import MisalignmentReport, misalignment, neighbors
from eamet.kernels.second_moment import SecondMoment

if TYPE_CHECKING:
    from eamet.edit.capacity import CapacityReport
    from eamet.edit.editor import Editor, EditResult
    from eamet.measure.evaluation import EvaluationReport, evaluate
    from eamet.measure.known import known_cases
    from eamet.measure.tracing import TraceReport, trace

__all__ = [
    "ArchSpec",
    "CapacityReport",
    "EametError",
    "EditConfig",
    "EditResult",
    "Editor",
    "EvaluationReport",
    "Fact",
    "MisalignmentReport",
    "SecondMoment",
    "TraceReport",
    "__version__",
    "errors",
    "evaluate",
    "get_num_threads",
    "known_architectures",
    "known_cases",
    "load_dataset",
    "misalignment",
    "neighbors",
    "register_arch",
    "set_num_threads",
    "trace",
]

_LAZY = {
    "CapacityReport": "eamet.edit.capacity",
    "Editor": "eamet.edit.editor",
    "EditResult": "eamet.edit.editor",
    "EvaluationReport": "eamet.measure.evaluation",
    "evaluate": "eamet.measure.evaluation",
    "known_cases": "eamet.measure.known",
    "TraceReport": "eamet.measure.tracing",
    "trace": "eamet.measure.tracing",
}


_SUBPACKAGES = ("models", "sandbox")


def __getattr__(name: str) -> Any:
    # The editing names need torch; importing them lazily keeps `import eamet` torch-free.
    if name in _LAZY or name in _SUBPACKAGES:
        import importlib

        module = importlib.import_module(_LAZY.get(name, f"eamet.{name}"))
        value = module if name in _SUBPACKAGES else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eamet' has no attribute {name!r}")
