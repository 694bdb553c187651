"""Helpers for the end-to-end editing tests (edit/test_editing.py): tiny facts, configs, weight snapshots."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from eamet import EditConfig, Fact
from eamet.base.settings import Method
from eamet.edit.editor import Editor
from eamet.model.parts import ModelParts
from tiny import corpus, tiny_model

CORPUS = list(corpus())
VOCAB = 256


def small_model(family: str = "gpt2", seed: int = 0, **kwargs: Any) -> nn.Module:
    return tiny_model(family, seed=seed, vocab_size=VOCAB, **kwargs)


def make_editor(model: nn.Module, tokenizer: Any, config: EditConfig, cache_dir: Any) -> Editor:
    return Editor(model, tokenizer, config=config, corpus=CORPUS, cache_dir=cache_dir)


# Subject-final prompt: the only shape where a residual at the subject's last token reliably moves a tiny
# random model's next-token prediction. The 16 subjects end in 16 distinct BPE tokens (checked by
# `check_distinct_last_tokens`): subjects sharing their last token ("Meitner", "Euler", "Hopper" all end in
# "er") share most of their key, and their edits then fight each other in a model this small.
PROMPT = "capital city : {}"
SUBJECTS = (
    "Danielle Darrieux",
    "Alan Turing",
    "Marie Curie",
    "Ada Lovelace",
    "Niels Bohr",
    "Emmy Noether",
    "Kurt Godel",
    "Paul Dirac",
    "Max Planck",
    "Pierre Martin",
    "Enrico Fermi",
    "Carl Gauss",
    "John Bernard",
    "John Nash",
    "Alan Kay",
    "Emma Brown",
)
# Single tokens (with their leading space) in tiny.bpe_tokenizer(vocab_size=256).
TARGETS = (
    "official",
    "language",
    "citizen",
    "teacher",
    "people",
    "Japan",
    "German",
    "English",
    "Lisbon",
    "Moscow",
    "Tokyo",
    "Madrid",
    "Berlin",
    "Rome",
    "London",
    "Paris",
)


def facts16() -> list[Fact]:
    return [Fact(PROMPT, s, t) for s, t in zip(SUBJECTS, TARGETS, strict=True)]


def small_facts(n: int = 4, prompt: str = PROMPT, offset: int = 0) -> list[Fact]:
    """``n`` facts from the 16 from ``offset`` on, their targets shifted to differ from facts16()'s."""
    return [
        Fact(prompt, SUBJECTS[(offset + i) % 16], TARGETS[(offset + i + 5) % 16], case_id=offset + i)
        for i in range(n)
    ]


def small_config(model: nn.Module, method: Method = "memit", **overrides: Any) -> EditConfig:
    """A fast config: 2 short templates (plus the bare prompt), 5 iterations, C over 50 corpus lines."""
    values: dict[str, Any] = {
        "template_length": 2,
        "template_seeds": ("The", "I"),
        "v_num_grad_steps": 5,
        "mom2_n_samples": 50,
        **overrides,
    }
    return EditConfig.for_model(model, method, **values)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, by name."""
    return {name: t.detach().clone() for name, t in model.state_dict(keep_vars=False).items()}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensor is not bit-identical to ``before`` (dtype, shape and every bit)."""
    now = model.state_dict()
    assert now.keys() == before.keys()
    return {name for name, t in now.items() if not bit_equal(t, before[name])}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, -0.0 vs 0.0 distinguished)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(bit_equal(sa[k], sb[k]) for k in sa)


def rewrite_names(model: nn.Module, layers: Iterable[int], spec: Any = None) -> set[str]:
    """state_dict names of the rewrite weights of ``layers``."""
    parts = ModelParts(model, spec)
    return {f"{parts.spec.rewrite_path(layer)}.weight" for layer in layers}


def flags(model: nn.Module) -> tuple[list[bool], list[bool]]:
    """(requires_grad per parameter, training per module)."""
    return [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]


def odd_flags(model: nn.Module) -> tuple[list[bool], list[bool]]:
    """Puts the model in training mode with an irregular requires_grad pattern; returns the flags."""
    model.train()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 1)
    return flags(model)


def single_token(tokenizer: Any, target: str) -> int:
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (target, ids)
    return int(ids[0])


@torch.no_grad()
def greedy_next(model: nn.Module, tokenizer: Any, text: str) -> int:
    """The greedy next token after ``text`` encoded as the tokenizer does by itself."""
    ids = tokenizer(text)["input_ids"]
    logits = model(input_ids=torch.tensor([ids])).logits
    return int(logits[0, -1].argmax())


def successes(model: nn.Module, tokenizer: Any, facts: Sequence[Fact]) -> int:
    """How many facts' targets (single tokens) the model now decodes greedily after the prompt."""
    return sum(greedy_next(model, tokenizer, f.text) == single_token(tokenizer, f.target) for f in facts)


def check_distinct_last_tokens(tokenizer: Any, facts: Sequence[Fact]) -> None:
    last = [tokenizer(f.text)["input_ids"][-1] for f in facts]
    assert len(set(last)) == len(last), "subjects must end in distinct tokens"


def report_arrays_equal(a: Any, b: Any) -> bool:
    """Every numpy field of two MisalignmentReports equal (NaN padding equal to NaN)."""
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            if value.dtype != other.dtype or value.shape != other.shape:
                return False
            nan_ok = value.dtype.kind == "f"
            if not np.array_equal(value, other, equal_nan=nan_ok):
                return False
        elif value != other:
            return False
    return True
