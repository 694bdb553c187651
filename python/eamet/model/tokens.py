"""Tokenisation for editing: BOS policy, target ids and the fact-token index, found by probing the tokenizer.

Nothing here looks at a model or tokenizer *name* (the reference's ``'llama' in class name`` checks). The
tokenizer is asked how it behaves instead:

* which special ids it prepends by itself (``native_prefix``: a BOS for LLaMA/Gemma-style tokenizers);
* whether a leading space becomes a lone word-boundary piece (``lone_space_piece``: SentencePiece's
  ``"▁"`` in LLaMA-2), which must not be part of a target continuation.

Every sequence is encoded without the tokenizer's special tokens, and the BOS policy's prefix is added
here, so the tokenizer object is never mutated (the reference toggles ``add_bos_token`` per call).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from eamet.base.choices import BosPolicy, FactToken
from eamet.base.errors import FactError, ParameterError
from eamet.base.facts import SUBJECT_SLOT, fill

__all__ = ["TokenAdapter", "add_reference_pad_token", "tokenizer_of"]


@dataclass(frozen=True)
class Encoded:
    """One tokenised prompt: ``ids`` (BOS policy applied) and the fact-token position in it."""

    ids: list[int]
    fact_index: int


class TokenAdapter:
    """Wraps a Hugging Face tokenizer with the behaviour editing needs.

    Args:
        tokenizer: any ``transformers`` tokenizer (fast ones give offsets; slow ones use the split method).
        bos: ``"native"`` (prepend what the tokenizer prepends by itself), ``"always"`` or ``"never"``.
    """

    def __init__(self, tokenizer: Any, bos: BosPolicy = "native") -> None:
        self.tokenizer = tokenizer
        self._fingerprint: str | None = None
        self.native_prefix = self._probe_prefix()
        if bos == "native":
            self.prefix = list(self.native_prefix)
        elif bos == "always":
            if tokenizer.bos_token_id is None:
                raise ParameterError("bos='always' but the tokenizer has no BOS token", argument="bos")
            self.prefix = [int(tokenizer.bos_token_id)]
        elif bos == "never":
            self.prefix = []
        else:
            allowed = ", ".join(map(repr, get_args(BosPolicy)))
            raise ParameterError(f"bos must be one of {allowed}, got {bos!r}", argument="bos")
        self.bos = bos
        self.lone_space_piece = self._probe_lone_space()
        self.dummy_prefix = self._probe_dummy_prefix()
        self.has_offsets = bool(getattr(tokenizer, "is_fast", False))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        # Only ever placed under a zero attention mask, so its value cannot change a result.
        self.pad_id = int(pad)

    # -- probes ----------------------------------------------------------------------------------------

    @classmethod
    def of(cls, tokenizer: Any, bos: BosPolicy = "native") -> TokenAdapter:
        """``tokenizer`` itself when it already is a ``TokenAdapter`` (its own BOS policy kept), else a new
        one over the Hugging Face tokenizer with ``bos``: what every function taking either accepts."""
        return tokenizer if isinstance(tokenizer, cls) else cls(tokenizer, bos)

    def _plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _probe_prefix(self) -> list[int]:
        probe = "Paris is a city"
        plain, full = self._plain(probe), list(self.tokenizer(probe)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def _probe_lone_space(self) -> bool:
        # LLaMA-2: " Paris" -> ["▁", "▁Paris"]: a first piece that decodes to nothing, then the word.
        for word in ("Paris", "the", "English"):
            ids = self._plain(" " + word)
            if len(ids) >= 2 and not self.tokenizer.decode(ids[:1]).strip() and ids[1:] == self._plain(word):
                return True
        return False

    def _probe_dummy_prefix(self) -> bool:
        # SentencePiece-style tokenizers add a word boundary before every separately encoded text.
        pieces = self.tokenizer.convert_ids_to_tokens(self._plain("Paris")[:1])
        return bool(pieces) and str(pieces[0]).startswith("▁")

    # -- encoding --------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the BOS policy's prefix and no other special tokens."""
        return self.prefix + self._plain(text)

    def target_ids(self, target: str) -> list[int]:
        """Ids of ``target`` as a continuation of a prompt: ``" " + target`` (a space is added if missing),
        without special tokens and without a lone leading word-boundary piece (algorithm.md §1.3).
        """
        text = target if target.startswith(" ") else " " + target
        ids = self._plain(text)
        if self.lone_space_piece and len(ids) >= 2 and not self.tokenizer.decode(ids[:1]).strip():
            ids = ids[1:]
        if not ids:
            raise FactError(f"target {target!r} tokenises to nothing")
        return ids

    def continuation_text(self, target: str, ids: Sequence[int]) -> str:
        """Text of the target prefix ``ids`` as appended to a prompt string (the reference's teacher-forcing
        input): decoded, with the target's leading space kept even where decoding drops it.
        """
        if not ids:
            return ""
        text = str(self.tokenizer.decode(list(ids)))
        return text if text.startswith(" ") else " " + text.lstrip()

    def fact_index(self, template: str, subject: str, fact_token: FactToken = "subject_last") -> int:
        """Position of the fact token in ``encode(fill(template, subject))``.

        Found from character offsets (fast tokenizers): the tokens whose span overlaps the subject's
        characters. Slow tokenizers use :meth:`fact_index_by_split`, the reference's method. Raises
        ``FactError`` if no token covers the subject.
        """
        if not self.has_offsets:
            return self.fact_index_by_split(template, subject, fact_token)
        text = fill(template, subject)
        start = template.index(SUBJECT_SLOT) + (len(subject) - len(subject.lstrip()))
        end = template.index(SUBJECT_SLOT) + len(subject.rstrip())
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets: Sequence[tuple[int, int]] = enc["offset_mapping"]
        covering = [t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not covering:
            raise FactError(f"subject {subject!r} not found among the tokens of {text!r}")
        n = len(self.prefix)
        if fact_token == "subject_last":
            return n + covering[-1]
        if fact_token == "subject_first":
            return n + covering[0]
        if fact_token == "subject_first_after_last":
            return n + min(covering[-1] + 1, len(offsets) - 1)
        raise ParameterError(f"unsupported fact_token {fact_token!r}", argument="fact_token")

    def fact_index_by_split(self, template: str, subject: str, fact_token: FactToken = "subject_last") -> int:
        """The reference's method (algorithm.md §1.4): tokenise the text before ``{}``, the subject and the
        text after it separately and count. Agrees with :meth:`fact_index` wherever the tokenizer does not
        merge across the subject's boundaries.
        """
        before, after = template.split(SUBJECT_SLOT, 1)
        if before:
            if not before.endswith(" "):
                raise FactError(f"split method needs a space before the subject in {template!r}")
            before, subject = before[:-1], " " + subject.strip()
        if self.dummy_prefix:
            subject = subject.strip()
        a = len(self.prefix) + (len(self._plain(before)) if before else 0)
        b = len(self._plain(subject))
        if fact_token == "subject_last":
            return a + b - 1
        if fact_token == "subject_first":
            return a
        if fact_token == "subject_first_after_last":
            return a + b if after.strip() else a + b - 1
        raise ParameterError(f"unsupported fact_token {fact_token!r}", argument="fact_token")

    def prompt(self, template: str, subject: str, fact_token: FactToken = "subject_last") -> Encoded:
        """``encode(fill(template, subject))`` and its fact-token index.

        Raises ``FactError`` if the index falls outside the encoded prompt (the split method can
        overshoot when tokens merge across the subject's boundary).
        """
        ids = self.encode(fill(template, subject))
        index = self.fact_index(template, subject, fact_token)
        if not 0 <= index < len(ids):
            raise FactError(
                f"subject {subject!r} in {template!r}: fact token {index} is outside the {len(ids)}-token "
                "prompt"
            )
        return Encoded(ids, index)

    def fingerprint(self) -> str:
        """A SHA-256 of the tokenizer's class and definition (a fast tokenizer's full JSON, else its
        vocabulary): two tokenizers with the same fingerprint turn the same text into the same ids. The
        BOS policy is not part of it (``prefix`` is recorded separately). Computed once.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(type(self.tokenizer).__name__.encode())
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None and hasattr(backend, "to_str"):
                # A fast tokenizer's full definition: vocabulary, merges, normaliser, pre-tokeniser.
                digest.update(backend.to_str().encode())
            else:
                vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
                digest.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
            self._fingerprint = "sha256:" + digest.hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """The probed behaviour, saved with edits and statistics (they depend on it)."""
        return {
            "bos": self.bos,
            "prefix": self.prefix,
            "native_prefix": self.native_prefix,
            "lone_space_piece": self.lone_space_piece,
            "dummy_prefix": self.dummy_prefix,
        }


def tokenizer_of(model: Any) -> Any:
    """The tokenizer of ``model`` when none is given: the one :func:`eamet.models.load` returned with it,
    else ``AutoTokenizer.from_pretrained`` of the model's own ``config.name_or_path``.

    Raises ``ParameterError`` saying how to pass one when neither exists (a model built from a config has
    no ``name_or_path``; a hub id that cannot be reached offline fails too).
    """
    from eamet.models.loader import tokenizer_for

    found = tokenizer_for(model)
    if found is not None:
        return found
    source = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    how = "pass the model's tokenizer: Editor(model, tokenizer)"
    if not source:
        raise ParameterError(f"the model does not say where it was loaded from; {how}", argument="tokenizer")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as exc:
        raise ParameterError(
            f"no tokenizer could be loaded from the model's name_or_path {source!r} ({exc}); {how}",
            argument="tokenizer",
        ) from exc


def add_reference_pad_token(model: Any, tokenizer: Any) -> None:
    """Reproduces the reference's pad handling (algorithm.md §1.2), for exact reproduction only.

    If the tokenizer has no pad token, adds ``[PAD]`` and grows the input and output embeddings by one
    row set to the mean of the existing rows. This changes the model's softmax (one more vocabulary entry)
    and cannot be undone by an ``EditResult``; eamet itself never needs it, as padding sits under the
    attention mask.
    """
    if tokenizer.pad_token is not None:
        return
    import torch

    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for matrix in (model.get_input_embeddings(), model.get_output_embeddings()):
            if matrix is not None:
                matrix.weight[-1] = matrix.weight[:-1].mean(dim=0)
