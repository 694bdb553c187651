"""The pocket model: a small transformers causal LM that has really learned a :class:`World`'s facts.

:func:`pocket_model` trains (or loads) a GPT-2 or LLaMA model, built from a config, with a byte-level BPE
tokenizer trained on the world's own text. It is trained on every phrasing of every true fact (and a record
world's ``known`` pairs), a third of them behind a filler sentence, with the loss on every token but the
subject's (invented names cannot be predicted; learning them would only waste capacity; in ``known`` pairs
the subject is not marked, so every token counts), until greedy recall reaches ``settings.target_recall``.
Models are cached on disk, keyed by the world's fingerprint and the settings; the default world's model
ships inside the package (see ``scripts/build_pocket.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from eamet.base.choices import Method, PocketArch
from eamet.base.errors import CacheError, ParameterError
from eamet.base.facts import SUBJECT_SLOT, fill
from eamet.base.files import cache_dir as cache_dir_for
from eamet.base.files import read_checked_dir, write_checked_dir
from eamet.base.progress import progress_bar
from eamet.model.batching import pad_right
from eamet.model.scoring import score_targets
from eamet.model.tokens import TokenAdapter
from eamet.sandbox.world import World

__all__ = [
    "DEFAULT_WORLD_SUBJECTS",
    "PocketSettings",
    "TrainingReport",
    "default_world",
    "edit_config",
    "pocket_model",
    "recall",
    "shipped_model_dir",
    "train_pocket",
    "train_tokenizer",
    "world_corpus",
]

# The default world: 1024 subjects × 4 relations = 4096 facts and edit cases, so that the number of
# edits can run to 8× the edited layer's d_ff (512).
DEFAULT_WORLD_SUBJECTS = 1024
_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
_MANIFEST = "pocket.json"
MIN_STEPS_PER_EPOCH = 16
# Part of the cache key: bump it when the training data or loop changes, so cached models are retrained.
_FORMAT = 2  # 2: a known pair's loss on its object only
_REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def default_world() -> World:
    """The world ``eamet demo`` uses: ``World.generate(seed=0, n_subjects=1024)`` (4096 facts)."""
    return World.generate(seed=0, n_subjects=DEFAULT_WORLD_SUBJECTS)


@dataclass(frozen=True)
class PocketSettings:
    """How a pocket model is built and trained; every field is part of the cache key.

    Attributes:
        arch: "llama" (RMSNorm, SwiGLU MLP, rotary positions) or "gpt2" (LayerNorm, GELU MLP, learned
            positions).
        hidden, ffn, layers, heads: model sizes; ``ffn`` is d_ff, the key dimension of every edited layer.
        vocab_size: BPE vocabulary size (the tokenizer may end smaller on a small world).
        max_epochs: upper bound on passes over the training statements.
        batch_size: statements per optimiser step.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up, then cosine decay over ``max_epochs``.
        prefix_rate: fraction of statements put behind a filler sentence.
        target_recall: stop once this fraction of every (fact, phrasing) is recalled greedily.
        check_every: epochs between recall checks.
        seed: seeds initialisation, shuffling and prefixes.
    """

    arch: PocketArch = "llama"
    hidden: int = 128
    ffn: int = 512
    layers: int = 4
    heads: int = 4
    vocab_size: int = 1024
    max_epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    prefix_rate: float = 0.3
    target_recall: float = 0.99
    check_every: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in get_args(PocketArch):
            allowed = ", ".join(map(repr, get_args(PocketArch)))
            raise ParameterError(f"arch must be one of {allowed}, got {self.arch!r}", argument="arch")
        for name in ("hidden", "ffn", "layers", "heads", "max_epochs", "batch_size", "check_every"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{name} must be >= 1, got {getattr(self, name)}", argument=name)
        if self.hidden % self.heads:
            raise ParameterError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.vocab_size < 300:
            raise ParameterError(f"vocab_size must be >= 300 (bytes + specials), got {self.vocab_size}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ParameterError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if not 0.0 <= self.prefix_rate <= 1.0:
            raise ParameterError(f"prefix_rate must be in [0, 1], got {self.prefix_rate}")
        if not (self.lr > 0.0 and self.weight_decay >= 0.0 and self.warmup_steps >= 1):
            raise ParameterError("lr must be > 0, weight_decay >= 0 and warmup_steps >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dataclasses.asdict(self)

    def key(self, world: World) -> str:
        """The cache key: a SHA-256 of the world's fingerprint, these settings and the library versions that
        change training."""
        import tokenizers
        import transformers

        payload = {
            "format": _FORMAT,
            "world": world.fingerprint(),
            "settings": self.to_dict(),
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class TrainingReport:
    """What training reached: ``recall`` over every (fact, phrasing), ``epochs`` run, ``seconds`` taken,
    ``history`` as ``(epoch, mean loss, recall or None)`` rows."""

    recall: float
    epochs: int
    seconds: float
    history: tuple[tuple[int, float, float | None], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recall": self.recall,
            "epochs": self.epochs,
            "seconds": self.seconds,
            "history": [list(row) for row in self.history],
        }


# -- tokenizer ---------------------------------------------------------------------------------------


def _world_text(world: World) -> list[str]:
    return [f"{prompt} {obj}" for prompt, obj, _ in _statements(world)] + list(world.fillers)


def train_tokenizer(world: World, vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on the world's statements and fillers, wrapped as a
    ``PreTrainedTokenizerFast`` that prepends ``<s>`` (BOS) to every text. Pad ``<pad>`` = 0, BOS = 1,
    EOS = 2, UNK = 3. Deterministic for a world.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_world_text(world), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# -- model -------------------------------------------------------------------------------------------


def build_model(settings: PocketSettings, vocab_size: int) -> nn.Module:
    """A freshly initialised causal LM of ``settings.arch`` (seeded by ``settings.seed``), float32."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    model: nn.Module
    if settings.arch == "llama":
        llama = LlamaConfig(
            hidden_size=settings.hidden,
            intermediate_size=settings.ffn,
            num_hidden_layers=settings.layers,
            num_attention_heads=settings.heads,
            num_key_value_heads=settings.heads,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **common,
        )
        model = LlamaForCausalLM(llama)
    else:
        gpt2 = GPT2Config(
            n_embd=settings.hidden,
            n_inner=settings.ffn,
            n_layer=settings.layers,
            n_head=settings.heads,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        model = GPT2LMHeadModel(gpt2)
    return model


# -- training data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    ids: tuple[int, ...]
    labels: tuple[int, ...]  # next-token targets, -100 where no loss is taken


def _statements(world: World) -> list[tuple[str, str, tuple[int, int] | None]]:
    """Every (filled prompt, object, subject's character span) the model should know: each fact in each
    phrasing of its relation, then the world's ``known`` pairs (span unknown: ``None``)."""
    out: list[tuple[str, str, tuple[int, int] | None]] = []
    for fact in world.facts:
        for phrasing in world.relation(fact.relation).phrasings:
            start = phrasing.index(SUBJECT_SLOT)
            out.append((fill(phrasing, fact.subject), fact.object, (start, start + len(fact.subject))))
    out.extend((prompt, obj, None) for prompt, obj in world.known)
    return out


def _example(tokenizer: Any, prefix: str, prompt: str, obj: str, subject: tuple[int, int] | None) -> _Example:
    """``prefix + prompt + " " + obj`` with the loss on every token but the subject's — or, for a known pair
    (``subject`` None), on the object's tokens only: its prompt is arbitrary text (CounterFact's
    paraphrases open with a random sentence) whose prediction would only take capacity from the facts;
    measured on 300 CounterFact records, recall 0.99 came after 18 epochs instead of 21."""
    text = f"{prefix}{prompt} {obj}"
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    positions = range(1, len(ids))
    if subject is None:
        # A token ending after the prompt is the object's (" Paris" starts at the separating space).
        prompt_end = len(prefix) + len(prompt)
        labels = [ids[t] if offsets[t][1] > prompt_end else -100 for t in positions]
    else:
        # Overlap with the name itself: a byte-level token " Nesaru" starts one character early.
        start, end = len(prefix) + subject[0], len(prefix) + subject[1]
        labels = [-100 if max(offsets[t][0], start) < min(offsets[t][1], end) else ids[t] for t in positions]
    return _Example(tuple(ids), (*labels, -100))


def _batches(examples: Sequence[_Example], batch_size: int, rng: random.Random) -> list[list[_Example]]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


# -- recall ------------------------------------------------------------------------------------------


def recall(
    model: nn.Module, tokenizer: Any, world: World, *, phrasings: Literal["all", "editing"] = "all"
) -> float:
    """Fraction of statements whose object is the greedy continuation (strict: every object token the
    arg-max): every fact in every phrasing plus the world's ``known`` pairs (``"all"``), or each fact in
    its relation's editing phrasing only (``"editing"``)."""
    tokens = TokenAdapter.of(tokenizer)
    if phrasings == "all":
        pairs = [(prompt, obj) for prompt, obj, _ in _statements(world)]
    else:
        pairs = [(fill(world.relation(f.relation).phrasings[0], f.subject), f.object) for f in world.facts]
    prompts = [p for p, _ in pairs]
    targets = [o for _, o in pairs]
    if not prompts:
        raise ParameterError("the world has no facts")
    scores = score_targets(model, tokens, prompts, targets, batch_size=256)
    return float(scores.strict.double().mean())


# -- training ----------------------------------------------------------------------------------------


def train_pocket(
    world: World, settings: PocketSettings | None = None, *, progress: bool = True
) -> tuple[nn.Module, Any, TrainingReport]:
    """Trains a tokenizer and a model on ``world`` from scratch (no cache). Returns the model (eval mode),
    the tokenizer and a :class:`TrainingReport`. Stops when recall reaches ``settings.target_recall``
    (checked every ``check_every`` epochs) or after ``max_epochs``.
    """
    settings = settings or PocketSettings()
    if not world.facts:
        raise ParameterError("the world has no facts to train on")
    start = time.perf_counter()
    rng = random.Random(settings.seed)
    tokenizer = train_tokenizer(world, settings.vocab_size)
    model = build_model(settings, len(tokenizer))
    statements = _statements(world)
    plain = [_example(tokenizer, "", *st) for st in statements]
    # Each filler as a prefix of every statement would multiply the data by len(fillers); a fixed, seeded
    # filler per statement keeps one extra variant.
    fillers = list(world.fillers) or [""]
    prefixed = [_example(tokenizer, rng.choice(fillers) + " ", *st) for st in statements]
    # A small world gets its statements repeated so that an epoch is at least MIN_STEPS_PER_EPOCH steps:
    # the schedule and the recall checks then mean the same on a world of 30 facts and of 4000.
    repeats = max(1, math.ceil(MIN_STEPS_PER_EPOCH * settings.batch_size / len(plain)))
    plain, prefixed = plain * repeats, prefixed * repeats
    steps_per_epoch = math.ceil(len(plain) / settings.batch_size)
    total_steps = steps_per_epoch * settings.max_epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98)
    )

    def schedule(step: int) -> float:
        warm = min(1.0, (step + 1) / settings.warmup_steps)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history: list[tuple[int, float, float | None]] = []
    reached = 0.0
    with progress_bar(
        total=settings.max_epochs, desc="training pocket model", unit="epoch", enabled=progress, leave=False
    ) as bar:
        epoch = 0
        for epoch in range(1, settings.max_epochs + 1):
            model.train()
            chosen = [
                pre if rng.random() < settings.prefix_rate else pl
                for pl, pre in zip(plain, prefixed, strict=True)
            ]
            total_loss = 0.0
            for batch in _batches(chosen, settings.batch_size, rng):
                inputs = pad_right([e.ids for e in batch], 0, "cpu")
                labels = pad_right([e.labels for e in batch], -100, "cpu")["input_ids"]
                logits = model(**inputs).logits
                loss = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach())
            measured: float | None = None
            if epoch % settings.check_every == 0 or epoch == settings.max_epochs:
                model.eval()
                measured = reached = recall(model, tokenizer, world)
            history.append((epoch, total_loss / steps_per_epoch, measured))
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / steps_per_epoch:.3f}", recall=f"{reached:.3f}")
            if measured is not None and measured >= settings.target_recall:
                break
    model.eval()
    report = TrainingReport(reached, epoch, time.perf_counter() - start, tuple(history))
    return model, tokenizer, report


# -- editing -----------------------------------------------------------------------------------------


# λ for the pocket models, measured (docs/sandbox.md): EditConfig.for_model's d_ff-scaled reference value
# (≈ 700 at d_ff 512) lets C outweigh a few dozen edits, so even MEMIT at N = 50 missed most of them.
POCKET_LAMBDA = 50.0


def edit_config(model: nn.Module, method: Method = "eamet", **overrides: Any) -> Any:
    """The :class:`~eamet.base.settings.EditConfig` used on pocket models: the method's reference settings
    (``EditConfig.for_model``) on blocks 0 and 1 with λ = ``POCKET_LAMBDA`` per layer, C over 4000 lines
    of the world's text, and the same residual budget for both methods: ‖δ‖ ≤ 0.75 ‖h‖ (MEMIT's rule).

    EAMET's reference rule, ‖δ‖ ≤ 2 ‖k‖, assumes keys about as long as hidden states; in the pocket
    models ‖k‖ ≈ 0.1 ‖h‖, so it caps δ near 0.2 ‖h‖ and no answer moves (N = 64: 6 % efficacy, z-step
    NLL ≈ 5; with the shared budget the z-step reaches NLL < 0.2). Pass ``clamp="key_norm",
    clamp_factor=2.0`` to get the reference rule back. Keyword arguments override anything.
    """
    from eamet.base.settings import EditConfig

    layers = overrides.get("layers", (0, 1))
    values: dict[str, Any] = {
        "layers": layers,
        "mom2_update_weight": POCKET_LAMBDA,  # one λ for every edited block
        "mom2_n_samples": 4000,
        "clamp": "hidden_norm",
        "clamp_factor": 0.75,
        **overrides,
    }
    return EditConfig.for_model(model, method, **values)


def world_corpus(world: World) -> list[str]:
    """Text for C = E[kkᵀ]: every statement of the world bare and behind each filler sentence, in a seeded
    order. The prefixes matter on a small world: with bare statements only, a few hundred distinct token
    contexts cannot span the keys' d_ff dimensions and λC + KKᵀ would be singular.
    """
    statements = [f"{prompt} {obj}" for prompt, obj, _ in _statements(world)]
    lines = statements + [f"{filler} {s}" for filler in world.fillers for s in statements]
    lines += list(world.fillers)
    random.Random(0).shuffle(lines)
    return lines


# -- caching and the shipped model -------------------------------------------------------------------


def shipped_model_dir() -> Path:
    """Where the default world's model ships inside the package."""
    return Path(__file__).with_name("data") / "pocket-default"


def save_pocket(
    directory: str | Path,
    model: nn.Module,
    tokenizer: Any,
    world: World,
    settings: PocketSettings,
    report: TrainingReport,
) -> Path:
    """Writes model (safetensors), tokenizer and a manifest (key, settings, report, SHA-256 of every file)
    into ``directory`` atomically (:func:`eamet.base.files.write_checked_dir`)."""

    def fill(staging: Path) -> dict[str, Any]:
        model.save_pretrained(staging)  # type: ignore[operator]
        tokenizer.save_pretrained(staging)
        return {
            "key": settings.key(world),
            "world_fingerprint": world.fingerprint(),
            "settings": settings.to_dict(),
            "training": report.to_dict(),
        }

    return write_checked_dir(directory, fill, _MANIFEST)


def load_pocket(
    directory: str | Path, *, expect_key: str | None = None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Loads a saved pocket model after checking every file against the manifest's SHA-256 (and the key,
    if given). Raises ``CacheError`` naming the file that is missing or does not match."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)

    def check_key(manifest: dict[str, Any]) -> None:
        if expect_key is not None and manifest.get("key") != expect_key:
            raise CacheError(f"{directory}: made for another world or settings", path=str(directory))

    manifest = read_checked_dir(directory, _MANIFEST, _REQUIRED_FILES, check_key)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.eval()  # type: ignore[no-untyped-call]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    return model, tokenizer, manifest


def pocket_model(
    world: World | None = None,
    *,
    settings: PocketSettings | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """The pocket model of ``world`` (default: :func:`default_world`) and its tokenizer.

    Loaded from the package (the default world with default settings), else from the cache
    (``cache_dir``, default ``$EAMET_CACHE_DIR/pocket`` or ``~/.cache/eamet/pocket``), else trained with
    :func:`train_pocket` and cached. A cached model is used only if its manifest's key — the world's
    fingerprint, the settings and the library versions — matches and every file matches its checksum.

    Returns:
        ``(model, tokenizer)``: a float32 causal LM in eval mode and a ``PreTrainedTokenizerFast`` that
        prepends BOS.
    """
    world = world or default_world()
    settings = settings or PocketSettings()
    key = settings.key(world)
    shipped = shipped_model_dir()
    if (shipped / _MANIFEST).is_file():
        manifest = json.loads((shipped / _MANIFEST).read_text())
        if (
            manifest.get("world_fingerprint") == world.fingerprint()
            and manifest.get("settings") == settings.to_dict()
        ):
            model, tokenizer, _ = load_pocket(shipped)
            return model, tokenizer
    directory = cache_dir_for("pocket", cache_dir)
    entry = directory / key
    if (entry / _MANIFEST).is_file():
        try:
            model, tokenizer, _ = load_pocket(entry, expect_key=key)
            return model, tokenizer
        except CacheError:
            pass  # a damaged entry is rebuilt below
    model, tokenizer, report = train_pocket(world, settings, progress=progress)
    if report.recall < settings.target_recall:
        warnings.warn(
            f"the pocket model recalls {report.recall:.1%} of the world after {report.epochs} epochs, below "
            f"the target {settings.target_recall:.0%}; raise max_epochs or the model's size",
            stacklevel=2,
        )
    save_pocket(entry, model, tokenizer, world, settings, report)
    return model, tokenizer
