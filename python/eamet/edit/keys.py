"""Keys and hidden states at the fact token (algorithm.md §3), template-averaged and streamed.

A *key* is the input of the rewrite module (the MLP down-projection) at the subject's last token; the
*hidden state* h is a block's output there. Keys are averaged over the context templates on the fly,
batch by batch, so memory holds N × d_ff floats, never (templates × N) × d_ff; every extraction forward
stops right after the deepest module it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eamet.base.choices import FactToken
from eamet.base.errors import FactError
from eamet.base.facts import SUBJECT_SLOT, Fact, fill
from eamet.base.progress import progress_bar
from eamet.model.batching import length_sorted_batches, pad_right
from eamet.model.hooks import by_position, record_inputs, record_outputs, run_until
from eamet.model.parts import ModelParts
from eamet.model.templates import template_weights
from eamet.model.tokens import Encoded, TokenAdapter

__all__ = ["PromptSet", "collect", "collect_layers"]


@dataclass
class PromptSet:
    """Every templated prompt of every fact, tokenised once: ``encoded[i][t]`` is fact i under template t
    (template 0 is the bare ``"{}"``).
    """

    facts: list[Fact]
    templates: list[str]
    encoded: list[list[Encoded]]
    weights: list[float]

    @classmethod
    def build(
        cls, tokens: TokenAdapter, facts: Sequence[Fact], templates: Sequence[str], fact_token: FactToken
    ) -> PromptSet:
        """Tokenises ``template ∘ prompt ∘ subject`` for each pair. Raises ``FactError`` naming the fact
        whose subject cannot be located.
        """
        encoded = []
        for i, fact in enumerate(facts):
            row = []
            for template in templates:
                try:
                    row.append(tokens.prompt(_templated(template, fact), fact.subject, fact_token))
                except FactError as exc:
                    raise FactError(f"fact {i}: {exc}", row=i) from None
            encoded.append(row)
        return cls(list(facts), list(templates), encoded, template_weights(templates))

    def text(self, fact: int, template: int) -> str:
        """The text of fact ``fact``'s prompt under template ``template``, subject filled in (what
        ``encoded[fact][template]`` tokenises)."""
        return fill(_templated(self.templates[template], self.facts[fact]), self.facts[fact].subject)


def _templated(template: str, fact: Fact) -> str:
    """The fact's prompt (still with its subject slot) inside a context template."""
    return template.replace(SUBJECT_SLOT, fact.prompt, 1)


def collect(
    model: nn.Module,
    parts: ModelParts,
    tokens: TokenAdapter,
    prompts: PromptSet,
    *,
    key_layer: int | None,
    hidden_layer: int | None,
    batch_size: int = 128,
    progress: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Keys at ``key_layer`` and hidden states at ``hidden_layer`` for every fact.

    Returns:
        ``(keys, hidden)``: keys (N, d_ff) float32, the template-weighted average of the rewrite module's
        input at the fact token (``None`` if ``key_layer`` is None); hidden (N, d) float32, block
        ``hidden_layer``'s output at the fact token of the bare prompt (``None`` if not asked).
        Both on the model's device.
    """
    layers = () if key_layer is None else (key_layer,)
    keys, hidden = collect_layers(
        model,
        parts,
        tokens,
        prompts,
        key_layers=layers,
        hidden_layer=hidden_layer,
        batch_size=batch_size,
        progress=progress,
    )
    return (None if key_layer is None else keys[key_layer]), hidden


@torch.no_grad()
def collect_layers(
    model: nn.Module,
    parts: ModelParts,
    tokens: TokenAdapter,
    prompts: PromptSet,
    *,
    key_layers: Sequence[int],
    hidden_layer: int | None,
    batch_size: int = 128,
    progress: bool = False,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """:func:`collect` for several blocks at once: one forward per batch, up to the deepest block asked
    for, gives the keys of every block in ``key_layers`` (the same numbers as one :func:`collect` per
    block on the same weights).

    Returns:
        ``(keys, hidden)``: keys ``{layer: (N, d_ff) float32}`` for each of ``key_layers``; hidden (N, d)
        float32 at ``hidden_layer`` (``None`` if not asked). On the model's device.
    """
    if not key_layers and hidden_layer is None:
        raise ValueError("collect_layers needs a key layer or a hidden layer")
    device = parts.device
    n = len(prompts.facts)
    templates = range(len(prompts.templates)) if key_layers else range(1)
    items = [(i, t) for i in range(n) for t in templates]
    lengths = [len(prompts.encoded[i][t].ids) for i, t in items]
    keys = {layer: torch.zeros((n, parts.key_dim(layer)), device=device) for layer in key_layers}
    hidden = torch.zeros((n, 0), device=device) if hidden_layer is not None else None
    watch_in = {f"key{layer}": parts.rewrite(layer) for layer in key_layers}
    watch_out = {"hidden": parts.block(hidden_layer)} if hidden_layer is not None else {}
    deepest = max([*key_layers, *([] if hidden_layer is None else [hidden_layer])])
    store: dict[str, torch.Tensor] = {}
    weights = torch.tensor(prompts.weights, device=device)
    batches = list(length_sorted_batches(lengths, batch_size))
    bar = progress_bar(
        total=len(batches), desc=f"keys (layer {deepest})", unit="batch", enabled=progress, leave=False
    )
    with bar as shown, record_inputs(watch_in, store), record_outputs(watch_out, store):
        for batch in batches:
            shown.update(1)
            sel = [items[b] for b in batch]
            enc = [prompts.encoded[i][t] for i, t in sel]
            inputs = pad_right([e.ids for e in enc], tokens.pad_id, device)
            run_until(model, parts.block(deepest), **inputs)
            rows = torch.arange(len(sel), device=device)
            pos = torch.tensor([e.fact_index for e in enc], device=device)
            fact_ids = torch.tensor([i for i, _ in sel], device=device)
            t_ids = torch.tensor([t for _, t in sel], device=device)
            for layer, layer_keys in keys.items():
                key_in = by_position(store[f"key{layer}"], *inputs["input_ids"].shape)
                layer_keys.index_add_(0, fact_ids, key_in[rows, pos].float() * weights[t_ids, None])
            if hidden is not None:
                h = store["hidden"][rows, pos].float()
                if hidden.shape[1] == 0:
                    hidden = torch.zeros((n, h.shape[1]), device=device)
                bare = t_ids == 0
                hidden[fact_ids[bare]] = h[bare]
    return keys, hidden
