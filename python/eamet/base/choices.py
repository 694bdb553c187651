"""Every closed set of names eamet accepts, defined once.

Each is a ``Literal`` type for signatures and mypy; ``typing.get_args(T)`` gives its values for
validation, error messages and command-line ``choices``. Torch-free and import-free, so the command line
can build its parser without loading the editing stack.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DTYPES",
    "BatchAlignment",
    "BosPolicy",
    "CaseKind",
    "Clamp",
    "DatasetKind",
    "DeltaInit",
    "FactToken",
    "KlAnchor",
    "Method",
    "ModelDType",
    "NormPenalty",
    "PocketArch",
    "Solver",
    "StatsDType",
    "TeacherForcing",
    "TraceKind",
    "WeightLayout",
    "ZDtype",
    "ZForward",
]

Method = Literal["eamet", "memit"]
"""Editing methods: the same procedure with different settings (settings.py)."""
FactToken = Literal["subject_last", "subject_first", "subject_first_after_last"]
"""Which token of the prompt carries the fact: its key is read and its residual written there."""
BosPolicy = Literal["native", "always", "never"]
"""Prepend BOS as the tokenizer does by itself, always, or never."""
DeltaInit = Literal["target_init", "zero"]
Clamp = Literal["key_norm", "hidden_norm", "none"]
NormPenalty = Literal["none", "fix_ks", "norm", "squared_norm"]
KlAnchor = Literal["initial_delta", "unedited"]
Solver = Literal["cholesky", "inverse"]
StatsDType = Literal["float32", "float64"]
TeacherForcing = Literal["ids", "string"]
PocketArch = Literal["llama", "gpt2"]
"""Architectures of the sandbox's pocket model."""
ZDtype = Literal["auto", "float32", "bfloat16"]
"""Compute dtype of the residual step's forward and backward (δ, losses and Adam stay float32)."""
ZForward = Literal["fast", "full"]
"""How each residual-step iteration runs the model: from the edited block's cached output, scoring only
target positions (``fast``), or the whole model with every position's logits (``full``, the reference)."""
BatchAlignment = Literal["none", "current", "second_pass"]
"""What a fact aligns against among the facts of its own batch (EAMET with fact_batch > 1)."""
ModelDType = Literal["float32", "bfloat16", "float16"]
"""The dtypes a model can be loaded in."""
TraceKind = Literal["block", "mlp"]
"""What causal tracing restores: a whole block's output or its MLP's."""
DatasetKind = Literal["counterfact", "zsre", "jsonl"]
"""Formats of an evaluation dataset file."""
CaseKind = Literal["counterfact", "zsre"]
"""Where an edit case comes from: CounterFact (with a true object) or zsRE (without)."""
WeightLayout = Literal["out_in", "in_out"]
"""How a rewrite module stores its weight: (d_out, d_in) as ``nn.Linear``, or (d_in, d_out) as GPT-2's
``Conv1D``."""

DTYPES: tuple[ModelDType, ...] = get_args(ModelDType)
