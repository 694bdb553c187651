"""The metrics an evaluation reports, named once (torch-free: runs and benchmarks read them without torch).

Three metrics, each strict and lenient (docs/evaluation.md): ``efficacy``, ``generalization``,
``specificity``; plus ``fluency``. Flat names join them: ``efficacy_strict`` ... (:data:`RATE_KEYS`), as
``eamet demo --json`` and :meth:`EvaluationReport.metrics` write them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "METRICS", "RATE_KEYS", "Rate", "RecordMetrics"]

METRICS = ("efficacy", "generalization", "specificity")
KINDS = ("strict", "lenient")
RATE_KEYS = tuple(f"{metric}_{kind}" for metric in METRICS for kind in KINDS)
"""``efficacy_strict``, ``efficacy_lenient``, ..., ``specificity_lenient``."""


@dataclass(frozen=True)
class Rate:
    """One metric of one record: the strict and lenient rates in [0, 1], ``None`` where not measured."""

    strict: float | None = None
    lenient: float | None = None


@dataclass(frozen=True)
class RecordMetrics:
    """Every metric of one evaluated record (``fluency`` in bits, ``None`` where not run)."""

    case_id: Any
    kind: str
    efficacy: Rate = field(default_factory=Rate)
    generalization: Rate = field(default_factory=Rate)
    specificity: Rate = field(default_factory=Rate)
    fluency: float | None = None

    def flat(self) -> dict[str, Any]:
        """``{"case_id", "kind", <RATE_KEYS>, "fluency"}``."""
        out: dict[str, Any] = {"case_id": self.case_id, "kind": self.kind}
        for metric in METRICS:
            rate: Rate = getattr(self, metric)
            out[f"{metric}_strict"], out[f"{metric}_lenient"] = rate.strict, rate.lenient
        out["fluency"] = self.fluency
        return out
