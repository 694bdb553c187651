"""The sandbox world: generated deterministically, shaped like CounterFact, read from both record forms."""

from __future__ import annotations

import json
from typing import Any

import pytest

from eamet.base.errors import FactError, ParameterError
from eamet.base.facts import SUBJECT_SLOT
from eamet.sandbox import DEFAULT_RELATIONS, Relation, World


def test_generation_is_deterministic_for_a_seed() -> None:
    a, b = World.generate(seed=3, n_subjects=40), World.generate(seed=3, n_subjects=40)
    assert a == b and a.fingerprint() == b.fingerprint()
    c = World.generate(seed=4, n_subjects=40)
    assert c.fingerprint() != a.fingerprint()
    data = json.loads(json.dumps(a.to_dict()))
    assert data == a.to_dict()
    assert World.from_dict(data) == a and World.from_dict(data).fingerprint() == a.fingerprint()
    with pytest.raises(ParameterError, match="world"):
        World.from_dict({"relations": []})


def test_generated_world_has_the_counterfact_shape() -> None:
    world = World.generate(seed=0, n_subjects=60, relations_per_subject=4)
    assert len(world.subjects) == 60 and len(set(world.subjects)) == 60
    assert all(len(s.split()) == 2 for s in world.subjects)
    assert len(world.facts) == 60 * 4 and len(world.cases) == len(world.facts)
    per_subject: dict[str, set[str]] = {}
    for fact in world.facts:
        per_subject.setdefault(fact.subject, set()).add(fact.relation)
        assert fact.object in world.relation(fact.relation).objects
    assert all(len(r) == 4 for r in per_subject.values())  # four distinct relations each
    truth = {(f.subject, f.relation): f.object for f in world.facts}
    relation_of = {r.phrasings[0]: r.name for r in world.relations}
    assert sorted(c.case_id for c in world.cases) == list(range(len(world.cases)))
    for case in world.cases:
        rw = case.rewrite
        relation = world.relation(relation_of[rw.prompt])
        assert rw.target_true == truth[(rw.subject, relation.name)]
        assert rw.target != rw.target_true and rw.target in relation.objects
        assert len(case.paraphrases) == len(relation.phrasings) - 1
        assert all(rw.subject in p and SUBJECT_SLOT not in p for p in case.paraphrases)
        assert len(case.neighborhood) <= 10
        for prompt, expected in case.neighborhood:
            head, tail = rw.prompt.split(SUBJECT_SLOT)
            assert prompt.startswith(head) and prompt.endswith(tail)
            subject = prompt[len(head) : len(prompt) - len(tail)]
            assert subject != rw.subject and truth[(subject, relation.name)] == expected == rw.target_true
    assert sum(bool(c.neighborhood) for c in world.cases) > len(world.cases) // 2


def test_statements_and_edit_facts() -> None:
    world = World.generate(seed=1, n_subjects=5, relations_per_subject=2)
    fact = world.facts[0]
    sentences = world.statements(fact)
    assert len(sentences) == len(world.relation(fact.relation).phrasings)
    assert all(s.endswith(" " + fact.object) and fact.subject in s for s in sentences)
    assert world.edit_facts(3) == [c.rewrite for c in world.cases[:3]]
    assert len(world.edit_facts()) == len(world.cases)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_subjects": 0}, "n_subjects"),
        ({"relations_per_subject": 0}, "relations_per_subject"),
        ({"relations_per_subject": len(DEFAULT_RELATIONS) + 1}, "relations_per_subject"),
        ({"name_syllables": (3, 2)}, "name_syllables"),
        ({"relations": (Relation("x", ("{} is",), ("a",)),), "relations_per_subject": 1}, "2 distinct"),
    ],
)
def test_bad_generation_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        World.generate(seed=0, **kwargs)


def test_relations_need_one_slot_per_phrasing() -> None:
    with pytest.raises(ParameterError, match="exactly one"):
        Relation("r", ("{} and {}",), ("a", "b"))
    with pytest.raises(ParameterError, match="no phrasings"):
        Relation("r", ())


ROME = [
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "relation_id": "P103",
        },
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    },
    {
        "case_id": 8,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Edwin of Northumbria",
            "target_new": {"str": "French"},
            "target_true": {"str": "English"},
        },
        "paraphrase_prompts": [],
        "neighborhood_prompts": [],
    },
]
EASYEDIT = [
    {
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux spoke the language",
        "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French",
    }
]


def test_rome_records() -> None:
    world = World.from_records(ROME)
    assert [c.case_id for c in world.cases] == [7, 8]
    first = world.cases[0]
    assert first.rewrite.prompt == "The mother tongue of {} is"
    assert (first.rewrite.target, first.rewrite.target_true) == ("English", "French")
    assert first.paraphrases == ("Shayna does this. Danielle Darrieux spoke the language",)
    assert first.neighborhood == (
        ("The mother tongue of Léon Blum is", "French"),
        ("Michel Rocard is a native speaker of", "French"),
    )
    assert len(world.relations) == 1  # one distinct rewrite prompt
    assert [(f.subject, f.object) for f in world.facts] == [
        ("Danielle Darrieux", "French"),
        ("Edwin of Northumbria", "English"),
    ]


def test_easyedit_records_match_the_rome_form() -> None:
    flat, rome = World.from_records(EASYEDIT).cases[0], World.from_records(ROME[:1]).cases[0]
    assert flat.rewrite.prompt == rome.rewrite.prompt and flat.rewrite.subject == rome.rewrite.subject
    assert (flat.rewrite.target, flat.rewrite.target_true) == (rome.rewrite.target, rome.rewrite.target_true)
    assert flat.paraphrases == ("Danielle Darrieux spoke the language",)
    assert flat.neighborhood == (("The mother tongue of Léon Blum is", "French"),)
    assert flat.case_id == 0  # no case_id: the row number


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({**EASYEDIT[0], "ground_truth": None}, "target_true"),
        ({**EASYEDIT[0], "locality_ground_truth": ["a", "b"]}, "differ in length"),
        ({**EASYEDIT[0], "rephrase_prompt": 3}, "list of strings"),
        ({**EASYEDIT[0], "case_id": "x7"}, "case_id"),
        ({"prompt": "no subject here", "subject": "X", "target_new": "y", "ground_truth": "z"}, "subject"),
    ],
)
def test_bad_records_are_named(record: dict[str, Any], match: str) -> None:
    with pytest.raises(FactError, match=match) as info:
        World.from_records([EASYEDIT[0], record])
    assert info.value.row == 1 and "record 1" in str(info.value)


def test_no_records() -> None:
    with pytest.raises(FactError, match="no records"):
        World.from_records([])
