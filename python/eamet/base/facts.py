"""Edit requests: :class:`Fact`, and the checks run on a list of them before any work starts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eamet.base.errors import FactError

__all__ = ["SUBJECT_SLOT", "Fact", "check_facts", "load_facts"]

SUBJECT_SLOT = "{}"


@dataclass(frozen=True)
class Fact:
    """One edit request: ``prompt`` with the subject slot ``{}`` should continue with ``target``.

    Example:
        >>> Fact(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English").text
        'The mother tongue of Danielle Darrieux is'

    Attributes:
        prompt: relation template holding ``{}`` exactly once (other braces are kept as text).
        subject: the entity substituted into ``{}``; its last token is where the edit is written.
        target: the new object. It is scored as a continuation, so a leading space is implied.
        target_true: the current (old) object, if known; used only in evaluation.
        case_id: the caller's identifier, kept in results and saved edits.
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None
    case_id: int | str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target"):
            if not isinstance(getattr(self, name), str):
                raise FactError(f"fact {name}: expected a string, got {type(getattr(self, name)).__name__}")
        slots = self.prompt.count(SUBJECT_SLOT)
        if slots != 1:
            raise FactError(
                f"fact prompt {self.prompt!r}: needs exactly one '{{}}' subject slot, found {slots}"
            )
        if not self.subject.strip():
            raise FactError(f"fact prompt {self.prompt!r}: the subject is empty")
        if not self.target.strip():
            raise FactError(f"fact {self.text!r}: the target is empty")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (no target)."""
        return fill(self.prompt, self.subject)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Fact:
        """Builds a fact from the formats in use:

        * ours: ``{"prompt", "subject", "target", "target_true"?, "case_id"?}``;
        * the ROME/MEMIT request: ``{"prompt", "subject", "target_new": {"str"}, "target_true": {"str"}}``,
          optionally wrapped as a CounterFact record ``{"case_id", "requested_rewrite": {...}}``;
        * the EasyEdit flat form, whose ``prompt`` holds the subject's text instead of ``{}``
          (``"target_new"``/``"ground_truth"`` as strings).
        """
        if not isinstance(record, Mapping):
            raise FactError(f"expected a mapping for a fact, got {type(record).__name__}")
        body: Mapping[str, Any] = record.get("requested_rewrite", record)
        try:
            prompt, subject = body["prompt"], body["subject"]
        except KeyError as exc:
            raise FactError(f"fact record is missing the key {exc.args[0]!r}: {dict(record)!r}") from None
        target = _text(body.get("target", body.get("target_new")))
        target_true = _text(body.get("target_true", body.get("ground_truth")))
        if target is None:
            raise FactError(f"fact record has no 'target' or 'target_new': {dict(record)!r}")
        if isinstance(prompt, str) and SUBJECT_SLOT not in prompt and isinstance(subject, str):
            if subject and subject in prompt:
                prompt = prompt.replace(subject, SUBJECT_SLOT, 1)
            else:
                raise FactError(
                    f"fact prompt {prompt!r}: has no '{{}}' and does not contain the subject {subject!r}"
                )
        case_id = record.get("case_id", body.get("case_id"))
        return cls(prompt=prompt, subject=subject, target=target, target_true=target_true, case_id=case_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in our format (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target": self.target}
        if self.target_true is not None:
            out["target_true"] = self.target_true
        if self.case_id is not None:
            out["case_id"] = self.case_id
        return out


def fill(template: str, subject: str) -> str:
    """Replaces the one ``{}`` in ``template`` by ``subject`` (never ``str.format``: text may hold braces)."""
    return template.replace(SUBJECT_SLOT, subject, 1)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("str")
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def check_facts(facts: Iterable[Fact | Mapping[str, Any]]) -> list[Fact]:
    """Validates and normalises a list of facts before any work starts.

    Dicts are converted with :meth:`Fact.from_dict`. Raises ``FactError`` for an empty list, for an item
    that is not a fact (``row`` = its index), and for duplicated or conflicting requests — the same
    subject in the same prompt, twice — listing every offending pair of indices.
    """
    out: list[Fact] = []
    for i, item in enumerate(facts):
        try:
            out.append(item if isinstance(item, Fact) else Fact.from_dict(item))
        except FactError as exc:
            raise FactError(f"fact {i}: {exc}", row=i) from None
    if not out:
        raise FactError("no facts to edit")
    first: dict[tuple[str, str], int] = {}
    problems: list[tuple[int, str]] = []
    for i, fact in enumerate(out):
        key = (fact.prompt, fact.subject.strip())
        j = first.setdefault(key, i)
        if j != i:
            same = out[j].target.strip() == fact.target.strip()
            kind = "duplicates" if same else "conflicts with"
            problems.append(
                (i, f"fact {i} {kind} fact {j} ({fact.text!r}: {out[j].target!r} vs {fact.target!r})")
            )
    if problems:
        shown = "; ".join(text for _, text in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise FactError(f"{len(problems)} repeated subject+prompt pair(s): {shown}{more}", row=problems[0][0])
    return out


def load_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file (one record per line) or a JSON list, in any format :meth:`Fact.from_dict`
    reads. Raises ``FactError`` naming the line of a bad record.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    records: list[Any]
    if path.suffix == ".json":
        loaded = json.loads(text)
        records = loaded if isinstance(loaded, list) else [loaded]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FactError(f"{path}:{lineno}: not valid JSON ({exc.msg})", path=str(path)) from None
    return check_facts(records)
