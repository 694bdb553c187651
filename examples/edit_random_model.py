"""Edit 16 facts into a small, randomly initialised LLaMA with EAMET and MEMIT, on a CPU, in seconds.

No download: the model is built from a config and the tokenizer is trained on a few generated sentences.
A random model knows no facts, so this shows the mechanics — keys, residuals, the solve, undo, save and
re-apply, the misalignment report — not editing quality on real knowledge. Prompts end with the subject
("capital city : {}"): in a random model only a residual at the *final* position can reach the output.

    python examples/edit_random_model.py [--facts 16] [--out /tmp/eamet-edit]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import eamet

TARGETS = ["Paris", "London", "Berlin", "Madrid", "Tokyo", "Moscow", "Lisbon", "Rome"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "da", "po", "li"]


def build_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def greedy(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def random_world(
    n_facts: int, *, hidden: int = 64, ffn: int = 256, layers: int = 4, corpus_lines: int = 600, seed: int = 0
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, list[eamet.Fact], list[str]]:
    """A random LLaMA, a BPE tokenizer trained for it, ``n_facts`` facts with invented subjects and a
    corpus for C, all from ``seed``. ``benches/bench_edit.py`` uses it too.
    """
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < 2 * n_facts:
        names.add("".join(rng.choices(SYLLABLES, k=rng.choice((3, 4)))).title())
    ordered = sorted(names)
    rng.shuffle(ordered)
    subjects = [f"{a} {b}" for a, b in zip(ordered[::2], ordered[1::2], strict=True)]
    words = [*ordered[:200], *TARGETS, "the", "city", "capital", "is", "of", "a", ":", "."]
    # Text for C = E[k kᵀ]: it must hold many more tokens than the key dimension, or λC is singular.
    corpus = [" ".join(rng.choices(words, k=12)) for _ in range(corpus_lines)]
    tokenizer = build_tokenizer(corpus + subjects)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    facts = [eamet.Fact("capital city : {}", s, rng.choice(TARGETS)) for s in subjects]
    return model, tokenizer, facts, corpus


def first_token_hits(model: torch.nn.Module, editor: eamet.Editor, facts: list[eamet.Fact]) -> int:
    """How many facts' prompts now make the target's first token the greedy next token."""
    return sum(
        greedy(model, editor.tokens.encode(f.text), 1) == editor.tokens.target_ids(f.target)[:1]
        for f in facts
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("/tmp/eamet-edit"))
    args = parser.parse_args()
    model, tokenizer, facts, corpus = random_world(args.facts)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    print(f"{len(facts)} facts, e.g. {facts[0].text!r} -> {facts[0].target!r}")
    print(f"{'method':<7} {'edited':>7} {'misalignment':>13} {'mean NLL':>9} {'seconds':>8}")
    for method in ("eamet", "memit"):
        # Random models have small hidden states; a wider ball lets one residual move the output.
        cfg = eamet.EditConfig.for_model(
            model, method, mom2_n_samples=len(corpus), clamp_factor=4.0, norm_penalty="none"
        )
        editor = eamet.Editor(model, tokenizer, config=cfg, corpus=corpus, cache_dir=args.out / "stats")
        result = editor.edit(facts, progress=False)
        hits = first_token_hits(model, editor, facts)
        s = result.summary()
        total = s["misalignment_total"]
        print(
            f"{method:<7} {hits:>3}/{len(facts):<3} {total if total is None else round(total, 3):>13} "
            f"{s['mean']['nll']:>9.3f} {s['residual_seconds']:>8.1f}"
        )
        path = args.out / f"{method}.safetensors"
        result.save(path)
        result.undo()
        assert all(torch.equal(p, original[n]) for n, p in model.named_parameters()), "undo is exact"
        eamet.EditResult.load(path).apply(model).undo()
    print(f"edits saved in {args.out}; undo and re-apply checked")


if __name__ == "__main__":
    main()
