"""Evaluation records: :class:`EditCase` and the dataset loaders (no torch).

An :class:`EditCase` is one edit request with what evaluation needs: the rewrite (a
:class:`~eamet.base.facts.Fact`), paraphrase prompts, neighbourhood prompts with their expected objects, and
prompts for the fluency test. :func:`load_dataset` reads the public files into cases:

* ``"counterfact"``: a JSON list of ROME/MEMIT CounterFact records (also multi-CounterFact) or of
  EasyEdit's flat CounterFact records;
* ``"zsre"``: a JSON list of MEND zsRE records (``zsre_mend_eval.json``) or EasyEdit's flat form;
* ``"jsonl"``: one record per line, in any of those forms, in :meth:`EditCase.to_dict`'s form, or in
  :meth:`Fact.to_dict <eamet.base.facts.Fact.to_dict>`'s (a bare edit: no paraphrases, no neighbours).

Record text is never passed to ``str.format`` (it may hold braces); the subject slot is filled with
:func:`~eamet.base.facts.fill`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from eamet.base.choices import CaseKind, DatasetKind
from eamet.base.errors import DatasetError, FactError, ParameterError
from eamet.base.facts import SUBJECT_SLOT, Fact

__all__ = [
    "DATASET_KINDS",
    "EditCase",
    "as_cases",
    "case_from_record",
    "cases_sharing_subjects",
    "cases_texts",
    "counterfact_case",
    "dataset_kind",
    "load_dataset",
    "zsre_case",
]

DATASET_KINDS: tuple[DatasetKind, ...] = get_args(DatasetKind)


@dataclass(frozen=True)
class EditCase:
    """One edit request with what evaluation needs (CounterFact's record, as data).

    Attributes:
        case_id: the record's id.
        rewrite: the edit; ``rewrite.target`` is the new object, ``rewrite.target_true`` the old one
            (``None`` for zsRE, which has no true object).
        paraphrases: filled prompts that should now continue with the new object.
        neighborhood: (filled prompt, expected object) pairs of other subjects, unchanged by the edit.
        generation_prompts: filled prompts for the fluency test (CounterFact's ``generation_prompts``);
            when empty, fluency is measured on the rewrite prompt.
        kind: the evaluation protocol: ``"counterfact"`` (strict and lenient metrics, evaluation prefixes)
            or ``"zsre"`` (strict only, no prefixes, token-level specificity).
    """

    case_id: int
    rewrite: Fact
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()
    kind: CaseKind = "counterfact"

    def __post_init__(self) -> None:
        if isinstance(self.case_id, bool) or not isinstance(self.case_id, int):
            raise FactError(f"case_id must be an integer, got {self.case_id!r}")
        if self.kind not in get_args(CaseKind):
            raise FactError(f"kind must be 'counterfact' or 'zsre', got {self.kind!r}")
        if not isinstance(self.rewrite, Fact):
            raise FactError(f"rewrite must be a Fact, got {type(self.rewrite).__name__}")

    def texts(self) -> list[str]:
        """Every sentence of the case as the model reads it — the rewrite prompt with its target, the
        paraphrases, the neighbourhood prompts with their objects, the generation prompts — e.g. as
        covariance text for C when no other corpus is at hand."""
        hood = [f"{prompt} {expected}" for prompt, expected in self.neighborhood]
        return [self.rewrite.text, *self.paraphrases, *hood, *self.generation_prompts]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through :meth:`from_dict`). ``generation_prompts`` and ``kind`` are
        written only when they differ from their defaults, so older dicts and fingerprints stay the same.
        """
        out: dict[str, Any] = {
            "case_id": self.case_id,
            "rewrite": self.rewrite.to_dict(),
            "paraphrases": list(self.paraphrases),
            "neighborhood": [list(pair) for pair in self.neighborhood],
        }
        if self.generation_prompts:
            out["generation_prompts"] = list(self.generation_prompts)
        if self.kind != "counterfact":
            out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditCase:
        """Inverse of :meth:`to_dict`. Raises ``FactError`` for a malformed dict."""
        try:
            hood = []
            for pair in data.get("neighborhood", ()):
                prompt, expected = pair
                if not isinstance(prompt, str) or not isinstance(expected, str):
                    raise FactError(f"neighbourhood pairs must be two strings, got {pair!r}")
                hood.append((prompt, expected))
            return cls(
                case_id=data["case_id"],
                rewrite=Fact.from_dict(data["rewrite"]),
                paraphrases=_strings(data.get("paraphrases")),
                neighborhood=tuple(hood),
                generation_prompts=_strings(data.get("generation_prompts")),
                kind=data.get("kind", "counterfact"),
            )
        except KeyError as exc:
            raise FactError(f"edit case is missing the key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, FactError):
                raise
            raise FactError(f"not an edit case: {exc}") from None


# -- parsers of one record --------------------------------------------------------------------------------


def counterfact_case(record: Mapping[str, Any], row: int) -> EditCase:
    """One CounterFact record as an :class:`EditCase` (kind ``"counterfact"``).

    Forms: ROME/MEMIT (``case_id``, ``requested_rewrite{prompt, subject, target_new{str},
    target_true{str}}``, ``paraphrase_prompts``, ``neighborhood_prompts`` — whose expected object is the
    true object — and ``generation_prompts``), which multi-CounterFact shares; or EasyEdit's flat form
    (``prompt`` holding the subject's text, ``subject``, ``target_new``, ``ground_truth``,
    ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``). Without a ``case_id`` the case
    id is ``row``.

    Raises ``FactError`` naming the record (``row``) if it cannot be read, including a missing true object.
    """
    try:
        _need_mapping(record)
        rewrite = Fact.from_dict(record)
        true = rewrite.target_true
        if true is None:
            raise FactError("no 'target_true' or 'ground_truth'")
        case_id = _case_id(record, row)
        rewrite = Fact(rewrite.prompt, rewrite.subject, rewrite.target, true, case_id)
        paraphrases = _strings(record.get("paraphrase_prompts", record.get("rephrase_prompt")))
        if "neighborhood_prompts" in record:
            hood = tuple((p, true) for p in _strings(record["neighborhood_prompts"]))
        else:
            hood = _locality(record)
        generation = _strings(record.get("generation_prompts"))
        return EditCase(case_id, rewrite, paraphrases, hood, generation, "counterfact")
    except FactError as exc:
        raise FactError(f"record {row}: {exc}", row=row) from None


def zsre_case(record: Mapping[str, Any], row: int) -> EditCase:
    """One zsRE record as an :class:`EditCase` (kind ``"zsre"``).

    MEND's form (``src``, ``subject``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``), mapped as the
    reference does (algorithm.md §8.1): the rewrite prompt is ``src`` with the subject's first occurrence
    replaced by ``{}``, the new object is ``answers[0]``, there is no true object (``target_true=None``),
    the paraphrase is ``rephrase`` and the one neighbour is ``(loc + "?", loc_ans)`` — the reference puts
    the ``"?"`` after ``loc``. The case id is ``case_id`` if present, else ``row``.

    EasyEdit's flat form (``prompt`` holding the subject, ``subject``, ``target_new``, ``ground_truth``,
    ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``) is read like its CounterFact
    twin: its ``ground_truth`` is kept as ``target_true`` but, as for every zsRE case, no lenient metric
    is computed from it.

    Raises ``FactError`` naming the record (``row``), e.g. when the subject is not in ``src``.
    """
    try:
        _need_mapping(record)
        case_id = _case_id(record, row)
        if "src" in record:
            src, subject = record.get("src"), record.get("subject")
            if not isinstance(src, str) or not isinstance(subject, str) or not subject.strip():
                raise FactError("'src' and 'subject' must be non-empty strings")
            if subject not in src:
                raise FactError(f"the subject {subject!r} is not in the src {src!r}")
            answers = record.get("answers")
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
                raise FactError(f"'answers' must be a non-empty list of strings, got {answers!r}")
            prompt = src.replace(subject, SUBJECT_SLOT, 1)
            rewrite = Fact(prompt, subject, answers[0], None, case_id)
            paraphrases = _strings(record.get("rephrase"))
            loc, loc_ans = record.get("loc"), record.get("loc_ans")
            if (loc is None) != (loc_ans is None):
                raise FactError("'loc' and 'loc_ans' must both be given or both be absent")
            hood: tuple[tuple[str, str], ...] = ()
            if loc is not None:
                if not isinstance(loc, str) or not isinstance(loc_ans, str) or not loc_ans.strip():
                    raise FactError("'loc' and 'loc_ans' must be strings, 'loc_ans' non-empty")
                hood = ((loc + "?", loc_ans),)
        else:
            flat = Fact.from_dict(record)
            rewrite = Fact(flat.prompt, flat.subject, flat.target, flat.target_true, case_id)
            paraphrases = _strings(record.get("rephrase_prompt"))
            hood = _locality(record)
        return EditCase(case_id, rewrite, paraphrases, hood, (), "zsre")
    except FactError as exc:
        raise FactError(f"record {row}: {exc}", row=row) from None


def case_from_record(record: Mapping[str, Any], row: int) -> EditCase:
    """A record of any supported form, recognised by its keys:

    * ``rewrite`` → :meth:`EditCase.from_dict`;
    * ``src`` (MEND zsRE) → :func:`zsre_case`;
    * ``requested_rewrite``, ``target_true`` or ``ground_truth`` (CounterFact, EasyEdit flat — read as
      CounterFact) → :func:`counterfact_case`;
    * otherwise a bare :class:`~eamet.base.facts.Fact` dict → a case with no paraphrases or neighbours.

    Raises ``FactError`` naming the record (``row``).
    """
    try:
        _need_mapping(record)
    except FactError as exc:
        raise FactError(f"record {row}: {exc}", row=row) from None
    if "rewrite" in record:
        try:
            return EditCase.from_dict(record)
        except FactError as exc:
            raise FactError(f"record {row}: {exc}", row=row) from None
    if "src" in record:
        return zsre_case(record, row)
    if any(key in record for key in ("requested_rewrite", "target_true", "ground_truth")):
        return counterfact_case(record, row)
    try:
        fact = Fact.from_dict(record)
        case_id = _case_id(record, row)
        return EditCase(case_id, Fact(fact.prompt, fact.subject, fact.target, fact.target_true, case_id))
    except FactError as exc:
        raise FactError(f"record {row}: {exc}", row=row) from None


# -- files ----------------------------------------------------------------------------------------------


def dataset_kind(path: str | Path) -> str:
    """The kind :func:`load_dataset` reads ``path`` as when none is given: ``"jsonl"`` for a ``.jsonl``
    file, else ``"counterfact"`` (a zsRE file must be named)."""
    return "jsonl" if str(path).endswith(".jsonl") else "counterfact"


def load_dataset(kind: str, path: str | Path, *, limit: int | None = None) -> list[EditCase]:
    """Reads an evaluation dataset into edit cases, in file order.

    Args:
        kind: ``"counterfact"`` (a JSON list, ROME/MEMIT or EasyEdit form; multi-CounterFact too),
            ``"zsre"`` (a JSON list, MEND or EasyEdit form) or ``"jsonl"`` (one record per line in any
            form :func:`case_from_record` recognises; blank lines are skipped).
        path: the file.
        limit: read only the first ``limit`` records (``None``: all).

    Returns:
        ``list[EditCase]`` of length ``min(limit, records in the file)``.

    Raises:
        ParameterError: unknown ``kind``, or ``limit < 1``.
        DatasetError: the file is missing or unreadable, is not valid JSON (``row`` = the record for a
            bad JSON line), is not a list, or holds no records; ``path`` names it.
        FactError: a record cannot be read; ``row`` is its 0-based index, ``path`` the file.
    """
    if kind not in DATASET_KINDS:
        raise ParameterError(
            f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}", argument="kind"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ParameterError(f"limit must be None or an integer >= 1, got {limit!r}", argument="limit")
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"dataset file {str(file)!r} does not exist", path=str(file)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"dataset file {str(file)!r} cannot be read: {exc}", path=str(file)) from None
    if kind == "jsonl":
        records: list[Any] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{file}: line {line_no} (record {len(records)}) is not valid JSON: {exc}",
                    path=str(file),
                    row=len(records),
                ) from None
        parse = case_from_record
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{file}: not valid JSON: {exc}", path=str(file)) from None
        if not isinstance(data, list):
            raise DatasetError(
                f"{file}: expected a JSON list of records, got a {type(data).__name__}", path=str(file)
            )
        records = data[:limit]
        parse = counterfact_case if kind == "counterfact" else zsre_case
    if not records:
        raise DatasetError(f"{file}: holds no records", path=str(file))
    cases = []
    for row, record in enumerate(records):
        try:
            cases.append(parse(record, row))
        except FactError as exc:
            raise FactError(f"{file}: {exc}", row=row, path=str(file)) from None
    return cases


def cases_sharing_subjects(cases: Iterable[EditCase], per_subject: int) -> list[EditCase]:
    """The multi-facts-per-subject scenario (the reference's ``repeat_subjects`` filter): keeps, in order,
    only the cases whose subject (compared after stripping spaces) has at least ``per_subject`` cases in
    ``cases``.

    ``per_subject=1`` keeps everything. Raises ``ParameterError`` for ``per_subject < 1``.
    """
    if isinstance(per_subject, bool) or not isinstance(per_subject, int) or per_subject < 1:
        raise ParameterError(
            f"per_subject must be an integer >= 1, got {per_subject!r}", argument="per_subject"
        )
    cases = list(cases)
    counts = Counter(case.rewrite.subject.strip() for case in cases)
    return [case for case in cases if counts[case.rewrite.subject.strip()] >= per_subject]


def cases_texts(cases: Iterable[EditCase]) -> list[str]:
    """Every sentence of ``cases`` (:meth:`EditCase.texts`, case after case): the covariance corpus eamet
    uses for C when no other text is at hand (``corpus="cases"`` of the demo and the benches).

    Raises ``FactError`` (with ``row``) for an item that is not an :class:`EditCase`.
    """
    texts: list[str] = []
    for row, case in enumerate(cases):
        if not isinstance(case, EditCase):
            raise FactError(f"cases_texts needs EditCase items, got {type(case).__name__}", row=row)
        texts += case.texts()
    return texts


# -- helpers --------------------------------------------------------------------------------------------


def _need_mapping(record: Any) -> None:
    if not isinstance(record, Mapping):
        raise FactError(f"expected a JSON object, got {type(record).__name__}")


def _case_id(record: Mapping[str, Any], row: int) -> int:
    case_id = record.get("case_id", row)
    if isinstance(case_id, bool) or not isinstance(case_id, int):
        raise FactError(f"case_id must be an integer, got {case_id!r}")
    return case_id


def _locality(record: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    prompts = _strings(record.get("locality_prompt"))
    answers = _strings(record.get("locality_ground_truth"))
    if len(answers) == 1 and len(prompts) > 1:
        answers = answers * len(prompts)
    if len(answers) != len(prompts):
        raise FactError("locality_prompt and locality_ground_truth differ in length")
    return tuple(zip(prompts, answers, strict=True))


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise FactError(f"expected a string or a list of strings, got {value!r}")


def as_cases(records: Sequence[EditCase | Mapping[str, Any]], *, what: str = "evaluate") -> list[EditCase]:
    """``records`` as edit cases: ``EditCase`` items kept, dicts read with
    :func:`~eamet.base.records.case_from_record`. Raises ``ParameterError`` for an empty sequence ("no records
    to ``what``") or an item of another type, ``FactError`` for a dict that cannot be read.
    """
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise ParameterError(
            f"records must be a sequence of EditCase (or record dicts), got {type(records).__name__}",
            argument="records",
        )
    cases = []
    for row, item in enumerate(records):
        if isinstance(item, EditCase):
            cases.append(item)
        elif isinstance(item, Mapping):
            cases.append(case_from_record(item, row))
        else:
            raise ParameterError(
                f"record {row}: expected an EditCase or a dict, got {type(item).__name__}",
                argument="records",
                row=row,
            )
    if not cases:
        raise ParameterError(f"no records to {what}", argument="records")
    return cases
