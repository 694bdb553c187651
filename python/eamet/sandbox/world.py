"""A world of facts to edit: generated from a seed, or read from CounterFact records.

A :class:`World` holds true facts (subject, relation, object) phrased in several ways, and edit cases
in the CounterFact shape: a rewrite (:class:`~eamet.base.facts.Fact` with ``target_true``), paraphrase prompts
that should follow the edit, and neighbourhood prompts (other subjects) that should keep their answers.
It is plain data — no torch — and hashes to a stable id, so a model trained on it can be cached by it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from eamet.base.errors import FactError, ParameterError
from eamet.base.facts import SUBJECT_SLOT, Fact, fill
from eamet.base.records import EditCase, counterfact_case

__all__ = ["DEFAULT_RELATIONS", "EditCase", "Relation", "World", "WorldFact"]


@dataclass(frozen=True)
class Relation:
    """A relation: ``phrasings`` are prompts with one ``{}`` (the first is the editing prompt, the others
    paraphrases); ``objects`` is the pool its objects are drawn from."""

    name: str
    phrasings: tuple[str, ...]
    objects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.phrasings:
            raise ParameterError(f"relation {self.name!r} has no phrasings")
        for phrasing in self.phrasings:
            if phrasing.count(SUBJECT_SLOT) != 1:
                raise ParameterError(f"relation {self.name!r}: {phrasing!r} needs exactly one '{{}}'")


@dataclass(frozen=True)
class WorldFact:
    """A true fact of the world."""

    subject: str
    relation: str
    object: str


# Relations of the generated world. Objects are common words, so that a tokenizer trained on the world
# gives most of them one or two tokens. Every phrasing ends with the subject, so its object is predicted
# at the subject's last token — where MEMIT and EAMET write. (Small models trained on subject-first or
# "... of {} is" prompts look facts up at the final position from the raw subject tokens instead, and no
# residual at the subject can move their answer: docs/sandbox.md has the measurements.)
DEFAULT_RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        ("The birthplace of {}", "The hometown of {}", "The city of birth of {}"),
        ("Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin"),
    ),
    Relation(
        "language",
        ("The mother tongue of {}", "The native language of {}", "The first language of {}"),
        (
            "French",
            "English",
            "German",
            "Spanish",
            "Italian",
            "Dutch",
            "Polish",
            "Greek",
            "Swedish",
            "Danish",
        ),
    ),
    Relation(
        "profession",
        ("The profession of {}", "The occupation of {}", "The job of {}"),
        ("teacher", "doctor", "farmer", "lawyer", "painter", "baker", "pilot", "nurse", "writer", "chemist"),
    ),
    Relation(
        "instrument",
        ("The instrument of {}", "The instrument played by {}", "The favorite instrument of {}"),
        ("piano", "violin", "guitar", "flute", "drums", "cello", "trumpet", "harp", "organ", "clarinet"),
    ),
    Relation(
        "sport",
        ("The sport of {}", "The sport played by {}", "The favorite sport of {}"),
        ("tennis", "football", "hockey", "cricket", "rugby", "golf", "boxing", "cycling", "rowing", "skiing"),
    ),
    Relation(
        "employer",
        ("The employer of {}", "The company employing {}", "The workplace of {}"),
        ("Google", "Nokia", "Siemens", "Toyota", "Apple", "Intel", "Philips", "Sony", "Boeing", "Samsung"),
    ),
    Relation(
        "color",
        ("The favorite color of {}", "The color preferred by {}", "The color loved by {}"),
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"),
    ),
    Relation(
        "food",
        ("The favorite dish of {}", "The food loved by {}", "The meal preferred by {}"),
        ("pasta", "rice", "soup", "pizza", "bread", "cheese", "fish", "salad", "noodles", "cake"),
    ),
    Relation(
        "country",
        ("The home country of {}", "The nationality of {}", "The citizenship of {}"),
        ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Mexico", "Norway", "Chile", "Kenya"),
    ),
    Relation(
        "pet",
        ("The pet of {}", "The animal owned by {}", "The companion animal of {}"),
        ("dog", "cat", "parrot", "rabbit", "horse", "turtle", "hamster", "goat", "snake", "pony"),
    ),
)

_SYLLABLES = (
    "ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "da", "po", "li", "ba", "fe", "gu", "ho",
    "ju", "me", "ni", "or", "pa", "qui", "ra", "se", "ta", "ul", "va", "wo", "xi", "yo",
)  # fmt: skip
_FILLERS = (
    "It rained for most of the week.",
    "The train left the station on time.",
    "Many people visited the market that morning.",
    "A new bridge was opened last spring.",
    "The museum is closed on Mondays.",
    "Nobody expected the storm to last so long.",
    "The library bought a thousand new books.",
    "Prices went up again this year.",
    "The festival attracted visitors from abroad.",
    "Somewhere a dog was barking.",
    "The old clock in the hall stopped at noon.",
    "The river froze early that winter.",
)


@dataclass(frozen=True)
class World:
    """Facts, edit cases and filler text. Build with :meth:`generate` or :meth:`from_records`.

    Attributes:
        relations: the relations (name → phrasings and object pool).
        facts: the true facts; a model trained on the world should recall each through every phrasing.
        cases: the edit requests, in order.
        fillers: neutral sentences, for prefixes in training and evaluation.
        seed: the seed of :meth:`generate` (``None`` for worlds read from records).
        known: more (filled prompt, object) pairs a model of the world should know — a record world's
            paraphrases (true object) and neighbourhood prompts — trained and recalled with the facts.
    """

    relations: tuple[Relation, ...]
    facts: tuple[WorldFact, ...]
    cases: tuple[EditCase, ...]
    fillers: tuple[str, ...] = _FILLERS
    seed: int | None = None
    known: tuple[tuple[str, str], ...] = ()
    _relation_index: dict[str, Relation] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {r.name: r for r in self.relations}
        if len(index) != len(self.relations):
            raise ParameterError("relation names must be unique")
        for fact in self.facts:
            if fact.relation not in index:
                raise ParameterError(f"fact {fact}: unknown relation {fact.relation!r}")
        object.__setattr__(self, "_relation_index", index)

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        *,
        n_subjects: int = 200,
        relations_per_subject: int = 4,
        relations: Sequence[Relation] = DEFAULT_RELATIONS,
        name_syllables: tuple[int, int] = (2, 3),
        n_neighbors: int = 10,
    ) -> World:
        """A world of ``n_subjects`` invented people, each with ``relations_per_subject`` facts.

        Subjects are two invented words of ``name_syllables`` syllables each ("Kalomi Nesaru"), unique.
        Every (subject, relation) fact becomes one edit case, in a seeded random order: the new object is
        another object of the relation's pool, paraphrases are the relation's other phrasings, and the
        neighbourhood is up to ``n_neighbors`` other subjects with the same relation and true object.
        Deterministic for a seed (Python's ``random.Random``, no global state).
        """
        if n_subjects < 1:
            raise ParameterError(f"n_subjects must be >= 1, got {n_subjects}", argument="n_subjects")
        if not 1 <= relations_per_subject <= len(relations):
            raise ParameterError(
                f"relations_per_subject must be in 1..{len(relations)}, got {relations_per_subject}",
                argument="relations_per_subject",
            )
        low, high = name_syllables
        if not 1 <= low <= high:
            raise ParameterError(
                f"name_syllables must be (low, high) with 1 <= low <= high, got {name_syllables}"
            )
        for relation in relations:
            if len(set(relation.objects)) < 2:
                raise ParameterError(f"relation {relation.name!r} needs at least 2 distinct objects")
        rng = random.Random(seed)
        capacity = len(_SYLLABLES) ** low
        if capacity * capacity < 4 * n_subjects:
            raise ParameterError(f"too many subjects ({n_subjects}) for names of {low} syllables")

        def word() -> str:
            return "".join(rng.choices(_SYLLABLES, k=rng.randint(low, high))).capitalize()

        subjects: list[str] = []
        seen: set[str] = set()
        while len(subjects) < n_subjects:
            name = f"{word()} {word()}"
            if name not in seen:
                seen.add(name)
                subjects.append(name)
        facts = [
            WorldFact(subject, relation.name, rng.choice(relation.objects))
            for subject in subjects
            for relation in rng.sample(list(relations), relations_per_subject)
        ]
        index = {r.name: r for r in relations}
        by_answer: dict[tuple[str, str], list[str]] = {}
        for fact in facts:
            by_answer.setdefault((fact.relation, fact.object), []).append(fact.subject)
        order = list(range(len(facts)))
        rng.shuffle(order)
        cases = []
        for case_id, i in enumerate(order):
            fact = facts[i]
            relation = index[fact.relation]
            new = rng.choice([o for o in relation.objects if o != fact.object])
            others = [s for s in by_answer[(fact.relation, fact.object)] if s != fact.subject]
            neighbors = rng.sample(others, min(n_neighbors, len(others)))
            cases.append(
                EditCase(
                    case_id=case_id,
                    rewrite=Fact(relation.phrasings[0], fact.subject, new, fact.object, case_id),
                    paraphrases=tuple(fill(p, fact.subject) for p in relation.phrasings[1:]),
                    neighborhood=tuple((fill(relation.phrasings[0], s), fact.object) for s in neighbors),
                )
            )
        return cls(tuple(relations), tuple(facts), tuple(cases), seed=seed)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> World:
        """A world from CounterFact records, in the ROME/MEMIT form (``case_id``, ``requested_rewrite``,
        ``paraphrase_prompts``, ``neighborhood_prompts``) or EasyEdit's flat form (``prompt``,
        ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
        ``locality_ground_truth``).

        True facts come from ``target_true``/``ground_truth`` (one relation per distinct rewrite prompt),
        edit targets from ``target_new``. Raises ``FactError`` naming the record that cannot be read.
        """
        return cls.from_cases([counterfact_case(record, row) for row, record in enumerate(records)])

    @classmethod
    def from_cases(cls, cases: Iterable[EditCase]) -> World:
        """A world from CounterFact-kind edit cases (e.g. ``eamet.load_dataset("counterfact", path)``).

        Each case's rewrite prompt is a relation (named ``r0``, ``r1`` ... in order of appearance) and its
        subject's ``target_true`` a true fact. The model should also know the paraphrases (with the true
        object) and the neighbourhood prompts (with their objects): they are kept in :attr:`known`.
        """
        relations: dict[str, Relation] = {}
        facts: list[WorldFact] = []
        known: dict[tuple[str, str], None] = {}
        kept: list[EditCase] = []
        for row, case in enumerate(cases):
            rewrite = case.rewrite
            true = rewrite.target_true
            if true is None or case.kind != "counterfact":
                raise FactError(f"case {row}: a world needs CounterFact cases with a true object", row=row)
            name = f"r{len(relations)}" if rewrite.prompt not in relations else relations[rewrite.prompt].name
            relations.setdefault(rewrite.prompt, Relation(name, (rewrite.prompt,)))
            facts.append(WorldFact(rewrite.subject, relations[rewrite.prompt].name, true))
            for prompt in case.paraphrases:
                known[(prompt, true)] = None
            for pair in case.neighborhood:
                known[pair] = None
            kept.append(case)
        if not kept:
            raise FactError("no records")
        return cls(tuple(relations.values()), tuple(facts), tuple(kept), known=tuple(known))

    # -- reading -------------------------------------------------------------------------------------

    def relation(self, name: str) -> Relation:
        """The relation called ``name``."""
        try:
            return self._relation_index[name]
        except KeyError:
            raise ParameterError(f"the world has no relation {name!r}") from None

    @property
    def subjects(self) -> list[str]:
        """The subjects of the true facts, in order of first appearance."""
        return list(dict.fromkeys(f.subject for f in self.facts))

    def statements(self, fact: WorldFact) -> list[str]:
        """``fact`` in every phrasing of its relation, as training sentences (prompt + " " + object)."""
        return [f"{fill(p, fact.subject)} {fact.object}" for p in self.relation(fact.relation).phrasings]

    def edit_facts(self, n: int | None = None) -> list[Fact]:
        """The first ``n`` (default all) cases' rewrites, ready for ``Editor.edit``."""
        return [case.rewrite for case in self.cases[:n]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready contents (the basis of :meth:`fingerprint`)."""
        return {
            "relations": [
                {"name": r.name, "phrasings": list(r.phrasings), "objects": list(r.objects)}
                for r in self.relations
            ],
            "facts": [asdict(f) for f in self.facts],
            "cases": [c.to_dict() for c in self.cases],
            "fillers": list(self.fillers),
            "seed": self.seed,
            # Only worlds read from records have these; leaving the key out keeps generated worlds'
            # fingerprints (and so their cached models) as they were.
            **({"known": [list(pair) for pair in self.known]} if self.known else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> World:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                relations=tuple(
                    Relation(r["name"], tuple(r["phrasings"]), tuple(r["objects"])) for r in data["relations"]
                ),
                facts=tuple(WorldFact(**f) for f in data["facts"]),
                cases=tuple(EditCase.from_dict(c) for c in data["cases"]),
                fillers=tuple(data["fillers"]),
                seed=data.get("seed"),
                known=tuple((str(p), str(o)) for p, o in data.get("known", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ParameterError(f"not a world's dict: {exc!r}") from None

    def fingerprint(self) -> str:
        """SHA-256 of the world's contents: equal worlds, equal fingerprints."""
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()
