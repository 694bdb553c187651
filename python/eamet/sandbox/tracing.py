"""Where does a model read a fact? An interchange check at the subject's last token.

For pairs of facts (A, B) of the same relation with different objects, run A's prompt but replace the
hidden state at A's subject's last token, at the output of block ``l``, by the state B's prompt has there
(block outputs are what MEMIT and EAMET change: the edited MLP writes into them). If the answer becomes B's
object, everything the model needs to answer flows through that state after block ``l``: an edit written
there can move the answer. If A's answer survives, the model reads the subject some other way (for instance
from the raw subject tokens at the final position), and no edit at the subject can reach it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eamet.base.arch import arch_for
from eamet.base.errors import ParameterError
from eamet.model.hooks import add_to_output, record_outputs
from eamet.model.parts import ModelParts, eval_mode
from eamet.model.tokens import TokenAdapter
from eamet.sandbox.world import World

__all__ = ["SubjectTrace", "trace_subject"]


@dataclass(frozen=True)
class SubjectTrace:
    """For each tested block ``blocks[i]``: ``moved[i]`` is the fraction of pairs whose greedy answer became
    B's object after the swap there, ``kept[i]`` the fraction still answering A's object (answers compared on
    the objects' first tokens). ``phrasing`` is the relation phrasing index used, ``pairs`` the number of
    (A, B) pairs."""

    blocks: list[int]
    moved: list[float]
    kept: list[float]
    phrasing: int
    pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "moved": self.moved,
            "kept": self.kept,
            "phrasing": self.phrasing,
            "pairs": self.pairs,
        }


def _pairs(world: World, n_pairs: int, seed: int) -> list[tuple[Any, Any]]:
    by_relation: dict[str, list[Any]] = {}
    for fact in world.facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    rng = random.Random(seed)
    candidates = [fs for fs in by_relation.values() if len({f.object for f in fs}) > 1]
    if not candidates:
        raise ParameterError("no relation has two facts with different objects to swap")
    pairs: list[tuple[Any, Any]] = []
    for _ in range(50 * n_pairs):
        if len(pairs) == n_pairs:
            break
        facts = rng.choice(candidates)
        a, b = rng.sample(facts, 2)
        if a.object != b.object:
            pairs.append((a, b))
    return pairs


@torch.no_grad()
def trace_subject(
    model: nn.Module,
    tokenizer: Any,
    world: World,
    *,
    phrasing: int = 0,
    layers: Sequence[int] | None = None,
    n_pairs: int = 100,
    seed: int = 0,
) -> SubjectTrace:
    """Swaps the subject's last-token state between facts at each block (see the module docstring).

    Args:
        model, tokenizer: the causal LM and its tokenizer (or a ``TokenAdapter``).
        world: facts to pair; pairs share a relation and differ in object.
        phrasing: which phrasing of each relation to prompt with (0 is the editing one).
        layers: blocks to test (default all).
        n_pairs: how many (A, B) pairs, drawn with ``seed``.

    Returns:
        :class:`SubjectTrace` with one ``moved``/``kept`` rate per tested block.
    """
    tokens = TokenAdapter.of(tokenizer)
    parts = ModelParts(model, arch_for(model))
    blocks = list(range(parts.num_layers)) if layers is None else list(layers)
    for layer in blocks:
        if not 0 <= layer < parts.num_layers:
            raise ParameterError(f"block {layer} out of range 0..{parts.num_layers - 1}", argument="layers")
    if n_pairs < 1:
        raise ParameterError(f"n_pairs must be >= 1, got {n_pairs}", argument="n_pairs")
    shortest = min(len(r.phrasings) for r in world.relations)
    if not 0 <= phrasing < shortest:
        raise ParameterError(f"phrasing must be in 0..{shortest - 1}, got {phrasing}", argument="phrasing")
    pairs = _pairs(world, n_pairs, seed)
    device = next(model.parameters()).device
    moved = [0] * len(blocks)
    kept = [0] * len(blocks)
    with eval_mode(model):
        for a, b in pairs:
            template = world.relation(a.relation).phrasings[phrasing]
            enc_a, enc_b = tokens.prompt(template, a.subject), tokens.prompt(template, b.subject)
            ids_b = torch.tensor([enc_b.ids], device=device)
            seen: dict[int, torch.Tensor] = {}
            with record_outputs({layer: parts.block(layer) for layer in blocks}, seen):
                model(input_ids=ids_b)
            states_b = [seen[layer][0, enc_b.fact_index].clone() for layer in blocks]
            wanted_a = tokens.target_ids(a.object)[0]
            wanted_b = tokens.target_ids(b.object)[0]
            ids_a = torch.tensor([enc_a.ids], device=device)
            for i, layer in enumerate(blocks):
                answer = _answer_with_swap(model, parts, layer, ids_a, enc_a.fact_index, states_b[i])
                moved[i] += answer == wanted_b
                kept[i] += answer == wanted_a
    n = len(pairs)
    return SubjectTrace(blocks, [m / n for m in moved], [k / n for k in kept], phrasing, n)


def _answer_with_swap(
    model: nn.Module, parts: ModelParts, layer: int, ids: torch.Tensor, position: int, state: torch.Tensor
) -> int:
    def swap(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[0, position] = state
        return hidden

    with add_to_output(parts.block(layer), swap):
        logits = model(input_ids=ids).logits[0, -1]
    return int(logits.argmax())


def describe(trace: SubjectTrace) -> str:
    """One line per tested block: ``block 1: moved 0.97, kept 0.01``."""
    rows = zip(trace.blocks, trace.moved, trace.kept, strict=True)
    return "\n".join(f"block {b}: moved {m:.2f}, kept {k:.2f}" for b, m, k in rows)
