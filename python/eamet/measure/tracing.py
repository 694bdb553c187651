"""Causal tracing (ROME, Meng et al. 2022, §2.1): which blocks carry a fact at the subject's last token.

For each fact the prompt is run three ways:

* **clean**: as it is; the states at the subject's last token are recorded;
* **corrupted**: with Gaussian noise (standard deviation ν) added to the input embeddings of the subject's
  tokens, several samples, which makes the model lose the fact;
* **restored**: corrupted, but with one clean state put back at the subject's last token — the output of
  block l (``"block"``), or the MLP outputs of a window of blocks around l (``"mlp"``).

What is measured is P(the true object's first token) after the prompt. Restored minus corrupted is the
*indirect effect* of the state: how much of the fact flows through it. The MLP's output is the rewrite
module's output (the registry's MLP down projection), i.e. the MLP's whole contribution to the residual
stream — the vectors MEMIT and EAMET change. :func:`trace` returns a :class:`TraceReport`.

(:func:`eamet.sandbox.trace_subject` is a different check: it swaps the subject's state between two facts
and reads the greedy answer.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import nn

from eamet.base.choices import TraceKind
from eamet.base.errors import FactError, ParameterError, UnsupportedArchitectureError
from eamet.base.plotting import figure_class
from eamet.base.progress import progress_callback
from eamet.base.records import EditCase, as_cases
from eamet.model.batching import pad_right
from eamet.model.hooks import add_to_output, by_position, record_outputs
from eamet.model.parts import ModelParts
from eamet.model.tokens import TokenAdapter

__all__ = ["DEFAULT_WINDOW", "NOISE_STD_FACTOR", "TRACE_KINDS", "TraceReport", "trace"]

TRACE_KINDS: tuple[TraceKind, ...] = get_args(TraceKind)
# ROME's window for MLP traces (GPT-2 XL, 48 blocks; GPT-J, 28 blocks).
DEFAULT_WINDOW = 10
# ROME's noise: ν = 3 × the standard deviation of the subjects' token embeddings.
NOISE_STD_FACTOR = 3.0


@dataclass(frozen=True)
class TraceReport:
    """What :func:`trace` measured, averaged over records (each record first averaged over its samples).

    Attributes:
        clean: mean P(true object's first token) on the clean prompts.
        corrupted: mean P on the corrupted prompts (subject embeddings noised, nothing restored).
        restored: per kind (``"block"``, ``"mlp"``), a list of ``num_blocks`` means: P with the clean state
            of block l restored at the subject's last token.
        per_record: one dict per record, in input order: ``row``, ``case_id``, ``subject``, ``object`` (the
            true object), ``clean``, ``corrupted``, ``restored`` ({kind: list of num_blocks floats}).
        settings: ``kinds``, ``samples``, ``noise`` (ν), ``noise_rule`` (how ν was set), ``seed``,
            ``window``, ``num_blocks``, ``model_type``, ``bos``.
    """

    clean: float
    corrupted: float
    restored: dict[str, list[float]]
    per_record: list[dict[str, Any]] = field(repr=False)
    settings: dict[str, Any]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.restored)

    @property
    def num_blocks(self) -> int:
        return int(self.settings["num_blocks"])

    @property
    def n_records(self) -> int:
        return len(self.per_record)

    @property
    def total_effect(self) -> float:
        """Clean minus corrupted: how much the noise took away."""
        return self.clean - self.corrupted

    def indirect_effect(self, kind: str) -> list[float]:
        """Per block: mean restored minus mean corrupted probability for ``kind``."""
        if kind not in self.restored:
            raise ParameterError(f"the trace has no kind {kind!r} (it has {', '.join(self.kinds)})")
        return [p - self.corrupted for p in self.restored[kind]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"settings", "n_records", "clean", "corrupted", "total_effect", "blocks":
        [{"block", "<kind>_restored", "<kind>_indirect_effect", ...}], "per_record"}``."""
        blocks = []
        for layer in range(self.num_blocks):
            row: dict[str, Any] = {"block": layer}
            for kind in self.kinds:
                row[f"{kind}_restored"] = self.restored[kind][layer]
                row[f"{kind}_indirect_effect"] = self.restored[kind][layer] - self.corrupted
            blocks.append(row)
        return {
            "settings": dict(self.settings),
            "n_records": self.n_records,
            "clean": self.clean,
            "corrupted": self.corrupted,
            "total_effect": self.total_effect,
            "blocks": blocks,
            "per_record": [
                dict(r, restored={k: list(v) for k, v in r["restored"].items()}) for r in self.per_record
            ],
        }

    def table(self) -> str:
        """A header with the settings and baselines, then one line per block: restored P and indirect
        effect of each kind."""
        s = self.settings
        window = f", MLP window {s['window']}" if "mlp" in self.kinds else ""
        lines = [
            f"{self.n_records} records, {s['samples']} noise samples each, ν = {s['noise']:.4g} "
            f"({s['noise_rule']}), seed {s['seed']}{window}",
            f"P(true object): clean {self.clean:.4f}   corrupted {self.corrupted:.4f}   "
            f"total effect {self.total_effect:+.4f}",
            "block" + "".join(f"  {kind + ' restored':>14}  {kind + ' effect':>12}" for kind in self.kinds),
        ]
        for layer in range(self.num_blocks):
            cells = "".join(
                f"  {p[layer]:>14.4f}  {p[layer] - self.corrupted:>+12.4f}" for p in self.restored.values()
            )
            lines.append(f"{layer:>5}{cells}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Draws restored probability and indirect effect per block (one line per kind, the clean and
        corrupted baselines dashed) into a PNG/PDF/SVG at ``path``; returns the path. Needs ``eamet[plot]``
        (raises ``MissingDependencyError`` otherwise).
        """

        return _plot_trace(self, Path(path))


@dataclass(frozen=True)
class _Prompt:
    """One record, tokenised: the prompt's ids, the subject's token span, the answer's first token."""

    row: int
    case: EditCase
    ids: list[int]
    first: int  # the subject's first token
    last: int  # the subject's last token: where states are restored
    answer: int


@dataclass(frozen=True)
class _Restoration:
    """One restored run: ``kind`` at block ``block``; the clean state is put back in ``layers``."""

    kind: str
    block: int
    layers: tuple[int, ...]


@torch.no_grad()
def trace(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditCase | Mapping[str, Any]],
    *,
    kinds: Sequence[str] = TRACE_KINDS,
    window: int = DEFAULT_WINDOW,
    samples: int = 10,
    noise: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> TraceReport:
    """Causal tracing of facts at the subject's last token (see the module docstring), per block.

    Per record: one clean forward (batch 1), then the corrupted runs — ``samples`` rows unrestored and
    ``samples`` rows per (block, kind) — stacked into forwards of at most ``batch_size`` rows (a hook
    restores each row's own state, so one forward can serve several blocks). The noise of a record is
    drawn once, from ``seed`` and the record's position, and reused by every restored run of it (as ROME
    does), so differences between blocks are not sampling noise. Runs in eval mode without gradients and
    restores the model's mode; every hook is removed on return or on error.

    Args:
        model: a causal LM of a registered architecture (``.logits`` of shape (B, T, V)), with
            ``get_input_embeddings()``.
        tokenizer: its tokenizer, or a :class:`~eamet.model.tokens.TokenAdapter` (BOS policy).
        records: N edit cases (or record dicts) whose ``rewrite.target_true`` is set: the true object,
            which the model should know (select them with :func:`eamet.known_cases`).
        kinds: which states to restore: ``"block"`` (the block's output hidden state) and/or ``"mlp"``.
        window: MLP outputs restored per ``"mlp"`` run: blocks ``l - window // 2`` up to
            ``l + ceil(window / 2) - 1``, clipped to the model. Default 10, ROME's setting for GPT-2 XL
            (48 blocks) and GPT-J (28): there, restoring one MLP's output moves P only a little — the MLPs
            of several consecutive blocks write a fact together — and a window shows which stretch of
            blocks does. ``window=1`` restores block l's MLP alone; in a model of fewer than about 20
            blocks a window of 10 spans most of it, so pass a smaller one. The ``"block"`` kind always
            restores one block's output (the residual stream already sums what earlier blocks wrote).
        samples: noise samples per record (ROME: 10).
        noise: ν, the noise's standard deviation, in embedding units. Default: ``NOISE_STD_FACTOR`` (3) ×
            the standard deviation of the input embeddings of all the records' subject tokens (ROME).
        seed: seed of the noise (an integer >= 0).
        batch_size: rows per corrupted forward (memory: rows × prompt length × vocabulary logits).
        progress: show a progress bar over records × blocks.

    Returns:
        :class:`TraceReport` (per block: mean restored probability and indirect effect per kind; clean
        and corrupted baselines; per-record values; settings).

    Raises:
        ParameterError: no records, an unknown or empty ``kinds``, ``window < 1``, ``samples < 1``,
            ``noise <= 0`` (or not finite), ``seed < 0``, ``batch_size < 1``.
        FactError: a record without a true object, or whose subject cannot be found among its prompt's
            tokens; ``row`` names it.
        UnsupportedArchitectureError: the model's family is not registered, or it has no input embeddings.
    """
    chosen = _check_kinds(kinds)
    for name, value in (("window", window), ("samples", samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"{name} must be an integer >= 1, got {value!r}", argument=name)
    if noise is not None and not (isinstance(noise, (int, float)) and 0 < noise < float("inf")):
        raise ParameterError(f"noise must be a finite number > 0 (or None), got {noise!r}", argument="noise")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed must be an integer >= 0, got {seed!r}", argument="seed")
    cases = as_cases(records, what="trace")
    tokens = TokenAdapter.of(tokenizer)
    parts = ModelParts(model)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embeddings, nn.Module):
        raise UnsupportedArchitectureError(f"{parts.model_type}: the model has no input embedding module")
    prompts = [_prepare(tokens, case, row) for row, case in enumerate(cases)]
    restorations = [
        _Restoration(kind, layer, _restored_layers(kind, layer, window, parts.num_layers))
        for layer in range(parts.num_layers)
        for kind in chosen
    ]
    was_training = model.training
    model.eval()
    try:
        nu = (
            float(noise)
            if noise is not None
            else NOISE_STD_FACTOR * _subject_embedding_std(embeddings, prompts)
        )
        rows = []
        with progress_callback(progress, "trace", unit="block") as callback:
            for i, prompt in enumerate(prompts):

                def report(blocks_done: int, i: int = i) -> None:
                    if callback is not None:
                        callback(i * parts.num_layers + blocks_done, len(prompts) * parts.num_layers)

                rows.append(
                    _trace_one(
                        model, parts, embeddings, prompt, restorations, nu, samples, seed, batch_size, report
                    )
                )
    finally:
        model.train(was_training)
    restored = {
        kind: [
            float(np.mean([r["restored"][kind][layer] for r in rows])) for layer in range(parts.num_layers)
        ]
        for kind in chosen
    }
    settings = {
        "kinds": list(chosen),
        "samples": samples,
        "noise": nu,
        "noise_rule": "given" if noise is not None else f"{NOISE_STD_FACTOR:g} × std of subject embeddings",
        "seed": seed,
        "window": window,
        "num_blocks": parts.num_layers,
        "model_type": parts.model_type,
        "bos": tokens.bos,
    }
    return TraceReport(
        clean=float(np.mean([r["clean"] for r in rows])),
        corrupted=float(np.mean([r["corrupted"] for r in rows])),
        restored=restored,
        per_record=rows,
        settings=settings,
    )


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [kinds]
    chosen = tuple(dict.fromkeys(kinds))  # in order, without repeats
    unknown = [k for k in chosen if k not in TRACE_KINDS]
    if not chosen or unknown:
        raise ParameterError(
            f"kinds must be a non-empty selection of {', '.join(TRACE_KINDS)}, got {list(kinds)!r}",
            argument="kinds",
        )
    return chosen


def _restored_layers(kind: str, layer: int, window: int, num_layers: int) -> tuple[int, ...]:
    if kind == "block":
        return (layer,)
    # ROME's centring: `window` blocks starting window // 2 before l, clipped at both ends.
    return tuple(range(max(0, layer - window // 2), min(num_layers, layer + (window + 1) // 2)))


def _prepare(tokens: TokenAdapter, case: EditCase, row: int) -> _Prompt:
    fact = case.rewrite
    where = f"record {row} (case {case.case_id})"
    if fact.target_true is None or not fact.target_true.strip():
        raise FactError(
            f"{where}: has no true object to trace (a JSONL fact needs a target_true field; zsRE records "
            "have none)",
            row=row,
        )
    try:
        encoded = tokens.prompt(fact.prompt, fact.subject, "subject_last")
        first = tokens.fact_index(fact.prompt, fact.subject, "subject_first")
        answer = tokens.target_ids(fact.target_true)[0]
    except FactError as exc:
        raise FactError(f"{where}: {exc}", row=row) from None
    if not 0 <= first <= encoded.fact_index:
        raise FactError(f"{where}: the subject {fact.subject!r} has no tokens in {fact.text!r}", row=row)
    return _Prompt(row, case, encoded.ids, first, encoded.fact_index, answer)


def _subject_embedding_std(embeddings: nn.Module, prompts: Sequence[_Prompt]) -> float:
    """Standard deviation of every component of the input embeddings of all subject tokens (ROME's ν / 3)."""
    device = next(embeddings.parameters()).device
    ids = [i for p in prompts for i in p.ids[p.first : p.last + 1]]
    vectors = embeddings(torch.tensor(ids, device=device))
    return float(vectors.float().std())


def _record_noise(seed: int, row: int, shape: tuple[int, ...]) -> torch.Tensor:
    # Seeded per record, so a record's noise does not depend on the records before it.
    state = np.random.SeedSequence([seed, row]).generate_state(2, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) >> 1)
    return torch.randn(shape, generator=generator)


def _trace_one(
    model: nn.Module,
    parts: ModelParts,
    embeddings: nn.Module,
    prompt: _Prompt,
    restorations: Sequence[_Restoration],
    nu: float,
    samples: int,
    seed: int,
    batch_size: int,
    report: Callable[[int], None],
) -> dict[str, Any]:
    device = parts.device
    inputs = pad_right([prompt.ids], 0, device)
    # Clean run: the states to restore, at the subject's last token.
    modules: dict[Any, nn.Module] = {}
    for layer in range(parts.num_layers):
        modules["block", layer] = parts.block(layer)
        modules["mlp", layer] = parts.rewrite(layer)
    seen: dict[Any, torch.Tensor] = {}
    with record_outputs(modules, seen):
        clean_logits = model(**inputs).logits[0, -1]
    seq_len = len(prompt.ids)
    clean = {
        key: by_position(value, 1, seq_len)[0, prompt.last].detach().clone() for key, value in seen.items()
    }
    seen.clear()
    p_clean = float(clean_logits.float().softmax(-1)[prompt.answer])

    width = clean[("block", 0)].shape[-1]
    span = prompt.last - prompt.first + 1
    noise = (_record_noise(seed, prompt.row, (samples, span, width)) * nu).to(device)
    # Rows: `samples` unrestored, then `samples` per restoration, in order.
    plan: list[tuple[_Restoration | None, int]] = [(None, s) for s in range(samples)]
    plan += [(r, s) for r in restorations for s in range(samples)]
    per_block = len(restorations) // parts.num_layers
    probs = []
    for start in range(0, len(plan), batch_size):
        chunk = plan[start : start + batch_size]
        probs.append(_corrupted_forward(model, parts, embeddings, prompt, inputs, chunk, noise, clean))
        finished = max(0, start + len(chunk) - samples) // samples  # restorations done
        report(finished // per_block)
    p = torch.cat(probs).double()
    restored: dict[str, list[float]] = {r.kind: [] for r in restorations}
    for i, r in enumerate(restorations):
        restored[r.kind].append(float(p[samples * (i + 1) : samples * (i + 2)].mean()))
    return {
        "row": prompt.row,
        "case_id": prompt.case.case_id,
        "subject": prompt.case.rewrite.subject,
        "object": prompt.case.rewrite.target_true,
        "clean": p_clean,
        "corrupted": float(p[:samples].mean()),
        "restored": restored,
    }


def _corrupted_forward(
    model: nn.Module,
    parts: ModelParts,
    embeddings: nn.Module,
    prompt: _Prompt,
    inputs: dict[str, torch.Tensor],
    chunk: Sequence[tuple[_Restoration | None, int]],
    noise: torch.Tensor,
    clean: Mapping[tuple[str, int], torch.Tensor],
) -> torch.Tensor:
    """(R,) P(answer) for the R rows of ``chunk``: each row is noised with its sample and restores its
    own state; other rows are left alone."""
    device = noise.device
    batch, seq_len = len(chunk), len(prompt.ids)
    row_noise = noise[torch.tensor([s for _, s in chunk], device=device)]
    rows_of: dict[tuple[str, int], list[int]] = {}
    for row, (restoration, _) in enumerate(chunk):
        if restoration is not None:
            for layer in restoration.layers:
                rows_of.setdefault((restoration.kind, layer), []).append(row)

    def add_noise(x: torch.Tensor) -> torch.Tensor:
        noisy = by_position(x, batch, seq_len).clone()
        noisy[:, prompt.first : prompt.last + 1] += row_noise.to(noisy.dtype)
        return noisy.reshape(x.shape)

    def restore(key: tuple[str, int], rows: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        index = torch.tensor(rows, device=device)

        def edit(x: torch.Tensor) -> torch.Tensor:
            shaped = by_position(x, batch, seq_len).clone()
            shaped[index, prompt.last] = clean[key].to(shaped.dtype)
            return shaped.reshape(x.shape)

        return edit

    expanded = {name: t.repeat(batch, 1) for name, t in inputs.items()}
    with ExitStack() as stack:
        stack.enter_context(add_to_output(embeddings, add_noise))
        for (kind, layer), rows in rows_of.items():
            module = parts.block(layer) if kind == "block" else parts.rewrite(layer)
            stack.enter_context(add_to_output(module, restore((kind, layer), rows)))
        logits = model(**expanded).logits[:, -1]
    probs: torch.Tensor = logits.float().softmax(-1)[:, prompt.answer].cpu()
    return probs


def _plot_trace(report: TraceReport, path: Path) -> Path:
    """Writes two panels to ``path`` and returns it: (a) mean P(true object) with each kind's clean state
    restored at block l, between the clean and corrupted baselines (dashed); (b) the indirect effect
    (restored − corrupted) per block, with the 25–75 % range over records shaded.
    """
    figure = figure_class()
    fig = figure(figsize=(11, 4.2), layout="constrained")
    ax_prob, ax_effect = fig.subplots(1, 2)
    s = report.settings
    window = f", MLP window {s['window']}" if "mlp" in report.kinds else ""
    fig.suptitle(
        f"Causal trace at the subject's last token: {report.n_records} records, {s['samples']} samples, "
        f"ν = {s['noise']:.3g}{window}"
    )
    blocks = np.arange(report.num_blocks)
    colors = {"block": "#4477aa", "mlp": "#228833"}
    ax_prob.axhline(report.clean, color="0.3", linestyle="--", linewidth=1, label="clean")
    ax_prob.axhline(report.corrupted, color="#cc6677", linestyle="--", linewidth=1, label="corrupted")
    for kind in report.kinds:
        ax_prob.plot(
            blocks, report.restored[kind], marker="o", color=colors.get(kind), label=f"{kind} restored"
        )
        effects = np.array(
            [[r["restored"][kind][b] - r["corrupted"] for b in blocks] for r in report.per_record]
        )
        low, high = np.percentile(effects, [25, 75], axis=0)
        ax_effect.fill_between(blocks, low, high, color=colors.get(kind), alpha=0.2, linewidth=0)
        ax_effect.plot(blocks, report.indirect_effect(kind), marker="o", color=colors.get(kind), label=kind)
    ax_prob.set_ylim(-0.02, 1.02)
    ax_prob.set_xlabel("block")
    ax_prob.set_ylabel("P(true object's first token)")
    ax_prob.set_title("(a) probability with the clean state restored")
    ax_prob.legend(fontsize="small", loc="best")
    ax_effect.axhline(0.0, color="0.6", linewidth=1)
    ax_effect.set_xlabel("block")
    ax_effect.set_ylabel("indirect effect (restored − corrupted)")
    ax_effect.set_title("(b) mean indirect effect, 25–75 % of records shaded")
    ax_effect.legend(fontsize="small", loc="best")
    for ax in (ax_prob, ax_effect):
        ax.set_xticks(blocks)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
