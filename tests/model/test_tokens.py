"""Tokenisation for editing (``eamet.model.tokens.TokenAdapter``, algorithm.md §1.2-§1.4) on the tiny
tokenizers: a GPT-2-style byte-level BPE with and without a BOS, and a LLaMA-2-like SentencePiece BPE (dummy
prefix, lone "▁" piece before a space-prefixed word, BOS prepended)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from eamet.base.errors import FactError, ParameterError
from eamet.base.facts import fill
from eamet.model.tokens import Encoded, TokenAdapter
from tiny import BOS_ID, EOS_ID, PAD_ID, UNK_ID, bpe_tokenizer, sentencepiece_tokenizer

TOKENIZERS = {
    "bpe": lambda: bpe_tokenizer(add_bos=False),
    "bpe_bos": lambda: bpe_tokenizer(add_bos=True),
    "sp": sentencepiece_tokenizer,
}
NAMES = sorted(TOKENIZERS)
FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last")

TEMPLATES = [
    "The mother tongue of {} is",
    "capital city : {}",
    "{} is a",
    "{}",
    "{} lives in the city of",
    "In {}, people speak",
    "{}'s language is",
    "People in {} speak",
    "Hello there. {} is",
    "Paris is far. The capital {} is",
]
# In-vocabulary names (single or few pieces, space-prefixed first piece) and out-of-vocabulary ones.
SUBJECTS = ["Danielle Darrieux", "Marie Curie", "Paris", "France", "Louis", "Emma Brown", "Curie", "x"]
TARGETS = ["Paris", "London", "Berlin", "Tokyo", "English", "French", "Rome", "Curie", "New York", "42", "x"]
PROMPTS = [
    "capital city : Danielle Darrieux",
    "The mother tongue of Marie Curie is",
    "In Paris, people speak",
    "Hello",
    "The capital city of France is.",
]


def tokenizer(name: str) -> Any:
    return TOKENIZERS[name]()


def plain(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def bpe_variant(**special: Any) -> PreTrainedTokenizerFast:
    """A fresh copy of the tiny BPE with another post-processor / special-token set."""
    core = Tokenizer.from_str(bpe_tokenizer(add_bos=False).backend_tokenizer.to_str())
    processor = special.pop("post_processor", None)
    if processor is not None:
        core.post_processor = processor
    return PreTrainedTokenizerFast(tokenizer_object=core, **special)


class SlowTokenizer:
    """A fast tokenizer seen as a slow one: ``is_fast`` False and no offsets, as transformers' Python
    tokenizers."""

    is_fast = False

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def __call__(self, text: str, **kwargs: Any) -> Any:
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tok(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


# -- probes and the BOS policy -------------------------------------------------------------------------

PROBED = {  # name: (native prefix, lone space piece, dummy prefix)
    "bpe": ([], False, False),
    "bpe_bos": ([BOS_ID], False, False),
    "sp": ([BOS_ID], True, True),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bos", ["native", "always", "never"])
def test_probes_and_bos_policy(name: str, bos: str) -> None:
    native, lone, dummy = PROBED[name]
    a = TokenAdapter(tokenizer(name), bos=bos)  # type: ignore[arg-type]
    prefix = {"native": native, "always": [BOS_ID], "never": []}[bos]
    assert a.native_prefix == native and a.prefix == prefix
    assert a.describe() == {
        "bos": bos,
        "prefix": prefix,
        "native_prefix": native,
        "lone_space_piece": lone,
        "dummy_prefix": dummy,
    }
    assert a.has_offsets and a.pad_id == PAD_ID
    text = "The mother tongue of Danielle Darrieux is"
    assert a.encode(text) == prefix + plain(a.tokenizer, text)


def test_native_policy_matches_the_tokenizer_itself() -> None:
    """bos='native' encodes exactly as the tokenizer does with its special tokens."""
    for name in NAMES:
        tok = tokenizer(name)
        a = TokenAdapter(tok)
        for text in PROMPTS:
            assert a.encode(text) == list(tok(text)["input_ids"])


def test_bos_policy_errors() -> None:
    with pytest.raises(ParameterError) as info:
        TokenAdapter(bpe_tokenizer(add_bos=False), bos="sometimes")  # type: ignore[arg-type]
    assert info.value.argument == "bos"
    no_bos = bpe_variant(eos_token="</s>", unk_token="<unk>")
    assert no_bos.bos_token_id is None
    with pytest.raises(ParameterError, match="no BOS") as info:
        TokenAdapter(no_bos, bos="always")
    assert info.value.argument == "bos"
    assert TokenAdapter(no_bos, bos="never").prefix == []


def test_pad_id_fallbacks() -> None:
    """No pad token: the EOS id, else 0 (only ever placed under a zero attention mask)."""
    assert TokenAdapter(bpe_variant(eos_token="</s>", unk_token="<unk>")).pad_id == EOS_ID
    assert TokenAdapter(bpe_variant(unk_token="<unk>")).pad_id == 0
    assert TokenAdapter(bpe_variant(pad_token="<unk>", eos_token="</s>")).pad_id == UNK_ID


def test_prefix_probe_ignores_appended_specials() -> None:
    """A tokenizer that wraps text in BOS ... EOS: only the BOS is a prefix; no EOS is ever added."""
    both = bpe_variant(
        bos_token="<s>",
        eos_token="</s>",
        post_processor=processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
        ),
    )
    text = "capital city : Paris"
    assert both(text)["input_ids"][-1] == EOS_ID  # the tokenizer itself appends it
    a = TokenAdapter(both)
    assert a.native_prefix == [BOS_ID]
    assert a.encode(text) == [BOS_ID, *plain(both, text)]
    assert EOS_ID not in a.prompt("capital city : {}", "Paris").ids


def test_multi_token_native_prefix() -> None:
    two = bpe_variant(
        pad_token="<pad>",
        bos_token="<s>",
        post_processor=processors.TemplateProcessing(
            single="<pad> <s> $A", special_tokens=[("<pad>", PAD_ID), ("<s>", BOS_ID)]
        ),
    )
    a = TokenAdapter(two)
    assert a.native_prefix == [PAD_ID, BOS_ID]
    never = TokenAdapter(two, bos="never")
    for template, subject in [("capital city : {}", "Danielle Darrieux"), ("{} is a", "Paris")]:
        assert a.fact_index(template, subject) == never.fact_index(template, subject) + 2


def test_the_tokenizer_is_never_mutated() -> None:
    """The reference toggles add_bos_token per call; the adapter must leave the tokenizer as it was."""
    for name in NAMES:
        tok = tokenizer(name)
        state = tok.backend_tokenizer.to_str()
        specials = dict(tok.special_tokens_map)
        before = [list(tok(t)["input_ids"]) for t in PROMPTS]
        for bos in ("native", "always", "never"):
            a = TokenAdapter(tok, bos=bos)  # type: ignore[arg-type]
            a.prompt("The mother tongue of {} is", "Danielle Darrieux")
            a.target_ids("English")
            a.fact_index_by_split("capital city : {}", "Marie Curie")
        assert tok.backend_tokenizer.to_str() == state
        assert dict(tok.special_tokens_map) == specials
        assert [list(tok(t)["input_ids"]) for t in PROMPTS] == before


# -- target ids (§1.3) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_target_ids_continue_a_prompt_like_the_concatenated_string(name: str) -> None:
    """The [INF] check of §1.3: prompt ids + target ids == the ids of prompt + " " + target."""
    for bos in ("native", "never"):
        a = TokenAdapter(tokenizer(name), bos=bos)  # type: ignore[arg-type]
        for prompt, target in itertools.product(PROMPTS, TARGETS):
            assert a.encode(prompt) + a.target_ids(target) == a.encode(prompt + " " + target), (
                prompt,
                target,
            )


@pytest.mark.parametrize("name", NAMES)
def test_target_ids_shape(name: str) -> None:
    tok = tokenizer(name)
    a = TokenAdapter(tok)
    for target in TARGETS:
        ids = a.target_ids(target)
        assert ids == a.target_ids(" " + target)  # the implied space is not doubled
        assert BOS_ID not in ids and EOS_ID not in ids
        assert tok.decode(ids).strip() == target
        raw = plain(tok, " " + target)
        if name == "sp":  # LLaMA-2: " Paris" -> ["▁", "▁Paris"]; the lone dummy "▁" is dropped
            assert tok.decode(raw[:1]) == "" and ids == raw[1:]
        else:
            assert ids == raw


def test_target_ids_known_values() -> None:
    """tiny.py's documented pieces: single-token targets stay single tokens in every tokenizer."""
    for name in NAMES:
        tok = tokenizer(name)
        a = TokenAdapter(tok)
        for word in ["Paris", "London", "Berlin", "Madrid", "Tokyo", "Moscow", "Lisbon", "German", "Japan"]:
            ids = a.target_ids(word)
            assert len(ids) == 1
            piece = tok.convert_ids_to_tokens(ids)[0]
            assert piece == ("▁" if name == "sp" else "Ġ") + word


def test_target_without_tokens() -> None:
    class Empty(SlowTokenizer):
        def __call__(self, text: str, **kwargs: Any) -> Any:
            return {"input_ids": []} if text.strip() == "" else super().__call__(text, **kwargs)

    a = TokenAdapter(Empty(bpe_tokenizer(add_bos=False)))
    with pytest.raises(FactError, match="tokenises to nothing"):
        a.target_ids(" ")


# -- the fact token (§1.4) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fact_token", "expected"),
    [
        ("bpe", "subject_last", 8),
        ("bpe", "subject_first", 3),
        ("bpe", "subject_first_after_last", 8),  # nothing after the subject: falls back to its last token
        ("bpe_bos", "subject_last", 9),
        ("bpe_bos", "subject_first", 4),
        ("sp", "subject_last", 9),
        ("sp", "subject_first", 4),
    ],
)
def test_fact_index_known_values(name: str, fact_token: Any, expected: int) -> None:
    """tiny.py documents "capital city : Danielle Darrieux" as capital|city|:|D|an|ie|l|le|Darrieux."""
    a = TokenAdapter(tokenizer(name))
    enc = a.prompt("capital city : {}", "Danielle Darrieux", fact_token)
    assert enc.fact_index == expected
    piece = a.tokenizer.convert_ids_to_tokens([enc.ids[expected]])[0]
    assert piece.lstrip("Ġ▁") == ("D" if fact_token == "subject_first" else "Darrieux")


def test_fact_index_after_last_with_a_suffix() -> None:
    a = TokenAdapter(bpe_tokenizer(add_bos=False))
    last = a.fact_index("The mother tongue of {} is", "Danielle Darrieux")
    assert (
        a.fact_index("The mother tongue of {} is", "Danielle Darrieux", "subject_first_after_last")
        == last + 1
    )


@pytest.mark.parametrize("name", NAMES)
def test_fact_index_points_at_the_subject(name: str) -> None:
    """Tokenizer-agnostic meaning: the ids up to and including subject_last decode to the text up to the
    subject's end; subject_first..subject_last decode to exactly the subject."""
    tok = tokenizer(name)
    for bos in ("native", "never"):
        a = TokenAdapter(tok, bos=bos)  # type: ignore[arg-type]
        for template, subject in itertools.product(TEMPLATES, SUBJECTS):
            text = fill(template, subject)
            start = template.index("{}")
            end = start + len(subject)
            enc = a.prompt(template, subject)
            assert enc.ids == a.encode(text)

            def upto(n: int, ids: list[int] = enc.ids) -> str:
                return str(tok.decode(ids[:n], skip_special_tokens=True)).strip()

            last = enc.fact_index
            assert upto(last + 1) == text[:end].strip(), (template, subject)
            assert len(upto(last)) < len(text[:end].strip())
            first = a.fact_index(template, subject, "subject_first")
            assert len(a.prefix) <= first <= last
            assert upto(first) == text[:start].strip(), (template, subject)
            span = str(tok.decode(enc.ids[first : last + 1], skip_special_tokens=True)).strip()
            assert span == subject.strip(), (template, subject)
            after = a.fact_index(template, subject, "subject_first_after_last")
            assert after == (last + 1 if text[end:].strip() else last)


def test_fact_index_takes_the_slot_not_an_earlier_mention() -> None:
    a = TokenAdapter(bpe_tokenizer(add_bos=False))
    enc = a.prompt("Paris is far. The capital {} is", "Paris")
    tokens = a.tokenizer.convert_ids_to_tokens(enc.ids)
    assert tokens[:2] == ["P", "aris"] and enc.fact_index > 1
    assert tokens[enc.fact_index] == "ĠParis"


def test_fact_index_shifts_with_the_prefix() -> None:
    for name in ("bpe_bos", "sp"):
        native, never = TokenAdapter(tokenizer(name)), TokenAdapter(tokenizer(name), bos="never")
        for template, subject, fact_token in itertools.product(TEMPLATES[:4], SUBJECTS[:3], FACT_TOKENS):
            n = native.fact_index(template, subject, fact_token)  # type: ignore[arg-type]
            assert n == never.fact_index(template, subject, fact_token) + 1  # type: ignore[arg-type]
    always = TokenAdapter(bpe_tokenizer(add_bos=False), bos="always")
    plain_adapter = TokenAdapter(bpe_tokenizer(add_bos=False))
    assert always.fact_index("{} is a", "Paris") == plain_adapter.fact_index("{} is a", "Paris") + 1
    assert always.encode("Paris")[0] == BOS_ID


def test_fact_index_subject_with_surrounding_spaces() -> None:
    a = TokenAdapter(bpe_tokenizer(add_bos=False))
    assert a.fact_index("capital city :{}", " Paris") == a.fact_index("capital city : {}", "Paris")
    assert a.fact_index("{} is a", "Paris ") == a.fact_index("{} is a", "Paris")


@pytest.mark.parametrize("name", NAMES)
def test_offsets_agree_with_the_reference_split_method(name: str) -> None:
    """§1.4 [INF]: cross-check the offsets method against the reference's split-and-count method."""
    a = TokenAdapter(tokenizer(name))
    for template, subject, fact_token in itertools.product(TEMPLATES, SUBJECTS, FACT_TOKENS):
        by_offsets = a.fact_index(template, subject, fact_token)  # type: ignore[arg-type]
        by_split = a.fact_index_by_split(template, subject, fact_token)  # type: ignore[arg-type]
        ids = a.encode(fill(template, subject))
        if fact_token == "subject_first" and not a.tokenizer.decode(ids[by_split : by_split + 1]).strip():
            # The split method counts a lone space piece as the subject's first token; the offsets method
            # does too when the piece is SentencePiece's text-initial dummy prefix, and takes the next
            # token when the piece is the space before the subject (see below).
            assert by_offsets in (by_split, by_split + 1), (template, subject)
            assert (by_offsets == by_split) == (template.index("{}") == 0 and a.dummy_prefix)
        else:
            assert by_offsets == by_split, (template, subject, fact_token)


def test_subject_first_skips_a_lone_space_piece() -> None:
    """Where the space before the subject is a token of its own ("Ġ", "C", "u", "rie"), the offsets method
    takes the first token holding a subject character; the reference's split method counts the space
    token as the subject's first (algorithm.md §1.4 asks for the subject's first sub-token)."""
    for name in NAMES:
        a = TokenAdapter(tokenizer(name))
        enc = a.prompt("The mother tongue of {} is", "Curie", "subject_first")
        assert a.tokenizer.convert_ids_to_tokens([enc.ids[enc.fact_index]]) == ["C"]
        assert (
            a.fact_index_by_split("The mother tongue of {} is", "Curie", "subject_first")
            == enc.fact_index - 1
        )
        # The default (subject_last) agrees.
        assert a.fact_index("The mother tongue of {} is", "Curie") == a.fact_index_by_split(
            "The mother tongue of {} is", "Curie"
        )


@pytest.mark.parametrize("name", NAMES)
def test_slow_tokenizers_use_the_split_method(name: str) -> None:
    fast = TokenAdapter(tokenizer(name))
    slow = TokenAdapter(SlowTokenizer(tokenizer(name)))
    assert not slow.has_offsets
    assert slow.describe() == fast.describe()
    for template, subject in itertools.product(TEMPLATES, ["Danielle Darrieux", "Marie Curie", "Paris"]):
        for fact_token in FACT_TOKENS:
            assert slow.fact_index(template, subject, fact_token) == fast.fact_index_by_split(  # type: ignore[arg-type]
                template,
                subject,
                fact_token,  # type: ignore[arg-type]
            )
        assert slow.prompt(template, subject) == fast.prompt(template, subject)
    assert slow.target_ids("English") == fast.target_ids("English")


def test_split_method_needs_a_space_before_the_subject() -> None:
    a = TokenAdapter(bpe_tokenizer(add_bos=False))
    with pytest.raises(FactError, match="space before the subject"):
        a.fact_index_by_split("capital city:{}", "Paris")
    assert a.fact_index("capital city:{}", "Paris") == len(plain(a.tokenizer, "capital city:Paris")) - 1


@pytest.mark.parametrize("method", ["fact_index", "fact_index_by_split"])
def test_unsupported_fact_token(method: str) -> None:
    a = TokenAdapter(bpe_tokenizer(add_bos=False))
    with pytest.raises(ParameterError) as info:
        getattr(a, method)("capital city : {}", "Paris", "last")
    assert info.value.argument == "fact_token"


def test_subject_without_tokens() -> None:
    a = TokenAdapter(bpe_tokenizer(add_bos=False))
    with pytest.raises(FactError, match="not found among the tokens"):
        a.fact_index("capital city : {}", "   ")


def test_prompt_returns_encoded() -> None:
    a = TokenAdapter(sentencepiece_tokenizer())
    enc = a.prompt("The mother tongue of {} is", "Danielle Darrieux", "subject_first")
    assert isinstance(enc, Encoded)
    assert enc == Encoded(
        a.encode("The mother tongue of Danielle Darrieux is"),
        a.fact_index("The mother tongue of {} is", "Danielle Darrieux", "subject_first"),
    )
    assert enc.ids[0] == BOS_ID and 0 < enc.fact_index < len(enc.ids)


@pytest.mark.parametrize("name", NAMES)
def test_continuation_text_rebuilds_the_teacher_forcing_input(name: str) -> None:
    """The reference's string path (§1.3): prompt + decoded target prefix, re-tokenised, gives the prompt ids
    followed by that prefix's ids, for every prefix length of a multi-token target."""
    a = TokenAdapter(tokenizer(name))
    assert a.continuation_text("Paris", []) == ""
    for prompt, target in itertools.product(PROMPTS, ["French", "New York", "Curie", "English", "Paris"]):
        ids = a.target_ids(target)
        for k in range(1, len(ids) + 1):
            text = a.continuation_text(target, ids[:k])
            assert text.startswith(" ") and not text.startswith("  "), (target, k, text)
            assert (" " + target).startswith(text), (target, k, text)
            assert a.encode(prompt + text) == a.encode(prompt) + ids[:k], (prompt, target, k)


def test_continuation_text_keeps_the_space_sentencepiece_decoding_drops() -> None:
    a = TokenAdapter(sentencepiece_tokenizer())
    ids = a.target_ids("French")
    assert a.tokenizer.convert_ids_to_tokens(ids[:1]) == ["▁Fr"]
    assert a.tokenizer.decode(ids[:1]) == "Fr"  # Metaspace decoding drops the leading space ...
    assert a.continuation_text("French", ids[:1]) == " Fr"  # ... which the continuation keeps
    assert a.continuation_text("French", ids[:2]) == " Fren"


def test_reference_pad_token_grows_the_vocabulary_by_a_mean_row() -> None:
    # The reference's pad handling (docs/differences.md, row 8), for exact reproduction only.
    import copy

    import torch

    from eamet.model.tokens import add_reference_pad_token
    from tiny import tiny_model

    tok = copy.deepcopy(bpe_tokenizer(add_bos=False))  # the helper's tokenizer is cached: never mutate it
    tok.pad_token = None
    model = tiny_model("llama", vocab_size=len(tok))
    before = model.get_input_embeddings().weight.detach().clone()
    add_reference_pad_token(model, tok)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == len(tok) - 1
    embeddings = model.get_input_embeddings().weight.detach()
    assert embeddings.shape[0] == before.shape[0] + 1
    assert torch.equal(embeddings[:-1], before)
    torch.testing.assert_close(embeddings[-1], before.mean(dim=0))
    unembedding = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(unembedding[-1], unembedding[:-1].mean(dim=0))
    grown = embeddings.clone()
    add_reference_pad_token(model, tok)  # a tokenizer with a pad token is left alone
    assert torch.equal(model.get_input_embeddings().weight.detach(), grown)
