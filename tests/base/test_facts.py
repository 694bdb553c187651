"""Edit requests (``eamet.base.facts``): validation of one fact, the record formats ``Fact.from_dict`` reads,
and ``check_facts`` (duplicates and conflicts found before any work starts)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

import eamet
from eamet.base.errors import FactError
from eamet.base.facts import SUBJECT_SLOT, Fact, check_facts

DARRIEUX = Fact(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target="English")


# -- Fact ----------------------------------------------------------------------------------------------


def test_fact_text_and_defaults() -> None:
    assert DARRIEUX.text == "The mother tongue of Danielle Darrieux is"
    assert (DARRIEUX.target_true, DARRIEUX.case_id) == (None, None)
    assert eamet.Fact is Fact and SUBJECT_SLOT == "{}"
    with pytest.raises(FrozenInstanceError):
        DARRIEUX.target = "French"  # type: ignore[misc]
    same = Fact("The mother tongue of {} is", "Danielle Darrieux", "English")
    assert same == DARRIEUX and len({same, DARRIEUX}) == 1


def test_fact_text_never_formats_braces() -> None:
    """Only the one ``{}`` is filled; other braces, in the prompt or the subject, stay as text."""
    fact = Fact(prompt="{name} said {0}: {} is", subject="the {x} set {}", target="big")
    assert fact.text == "{name} said {0}: the {x} set {} is"
    assert Fact("{}", "Paris", "France").text == "Paris"


@pytest.mark.parametrize(
    ("prompt", "subject", "target", "match"),
    [
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "found 0"),
        ("{} and {} are", "A", "B", "found 2"),
        ("{}{} is", "A", "B", "found 2"),
        ("The capital of {} is", "", "Paris", "subject is empty"),
        ("The capital of {} is", " \t", "Paris", "subject is empty"),
        ("The capital of {} is", "France", "", "target is empty"),
        ("The capital of {} is", "France", "  ", "target is empty"),
        (None, "France", "Paris", "prompt: expected a string"),
        ("The capital of {} is", 3, "Paris", "subject: expected a string"),
        ("The capital of {} is", "France", {"str": "Paris"}, "target: expected a string"),
    ],
)
def test_fact_validation(prompt: Any, subject: Any, target: Any, match: str) -> None:
    with pytest.raises(FactError, match=match):
        Fact(prompt=prompt, subject=subject, target=target)


def test_fact_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Fact("no slot", "x", "y")


# -- Fact.from_dict ------------------------------------------------------------------------------------

ROME_REQUEST = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": {"str": "English", "id": "Q1860"},
    "target_true": {"str": "French", "id": "Q150"},
}


def test_from_dict_ours() -> None:
    record = {"prompt": "The capital of {} is", "subject": "France", "target": "Lyon", "target_true": "Paris"}
    fact = Fact.from_dict({**record, "case_id": 7})
    assert fact == Fact("The capital of {} is", "France", "Lyon", target_true="Paris", case_id=7)


def test_from_dict_rome_request() -> None:
    fact = Fact.from_dict(ROME_REQUEST)
    assert fact == Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French")


def test_from_dict_counterfact_record() -> None:
    """algorithm.md §8.1: the request sits in ``requested_rewrite``; ``case_id`` at the top level."""
    record = {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {**ROME_REQUEST, "relation_id": "P103"},
        "paraphrase_prompts": ["Shayna does this and Yossel goes still. Danielle Darrieux, a native"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
    fact = Fact.from_dict(record)
    assert fact.case_id == 0  # falsy ids are kept
    assert (fact.prompt, fact.subject, fact.target, fact.target_true) == (
        "The mother tongue of {} is",
        "Danielle Darrieux",
        "English",
        "French",
    )


def test_from_dict_case_id_inside_the_request() -> None:
    fact = Fact.from_dict({"requested_rewrite": {**ROME_REQUEST, "case_id": "cf-12"}})
    assert fact.case_id == "cf-12"
    outer = Fact.from_dict({"case_id": 5, "requested_rewrite": {**ROME_REQUEST, "case_id": 9}})
    assert outer.case_id == 5  # the record's own id wins


def test_from_dict_easyedit_flat() -> None:
    """EasyEdit: the prompt holds the subject's text; the first occurrence becomes the slot."""
    record = {
        "prompt": "What is the capital of France? France's capital is",
        "subject": "France",
        "target_new": "Lyon",
        "ground_truth": ["Paris"],
    }
    fact = Fact.from_dict(record)
    assert fact.prompt == "What is the capital of {}? France's capital is"
    assert (fact.target, fact.target_true) == ("Lyon", "Paris")
    assert fact.text == record["prompt"]


def test_from_dict_target_forms() -> None:
    base = {"prompt": "The capital of {} is", "subject": "France"}
    assert Fact.from_dict({**base, "target_new": ["Lyon", "Marseille"]}).target == "Lyon"
    assert Fact.from_dict({**base, "target_new": {"str": " Lyon"}}).target == " Lyon"  # kept verbatim
    assert Fact.from_dict({**base, "target": "Lyon", "target_new": {"str": "Nice"}}).target == "Lyon"
    assert Fact.from_dict({**base, "target": "Lyon", "target_true": None}).target_true is None


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"subject": "France", "target": "Lyon"}, "missing the key 'prompt'"),
        ({"prompt": "The capital of {} is", "target": "Lyon"}, "missing the key 'subject'"),
        ({"prompt": "The capital of {} is", "subject": "France"}, "no 'target'"),
        ({"prompt": "The capital of {} is", "subject": "France", "target_new": {"id": "Q90"}}, "no 'target'"),
        ({"prompt": "The capital of {} is", "subject": "France", "target": 5}, "no 'target'"),
        ({"prompt": "The capital of Spain is", "subject": "France", "target": "Lyon"}, "does not contain"),
        ({"prompt": "The capital of Spain is", "subject": "", "target": "Lyon"}, "does not contain"),
        ({"requested_rewrite": {"prompt": "The capital of {} is"}}, "missing the key 'subject'"),
        ({"prompt": "The capital of {} is", "subject": "France", "target": " "}, "target is empty"),
    ],
)
def test_from_dict_errors(record: dict[str, Any], match: str) -> None:
    with pytest.raises(FactError, match=match):
        Fact.from_dict(record)


@pytest.mark.parametrize("record", ["The capital of {} is", ["a", "b"], None, 3])
def test_from_dict_needs_a_mapping(record: Any) -> None:
    with pytest.raises(FactError, match="expected a mapping"):
        Fact.from_dict(record)


@pytest.mark.parametrize(
    "fact",
    [
        DARRIEUX,
        Fact("The capital of {} is", "France", "Lyon", target_true="Paris", case_id=0),
        Fact("{x} {}", "{y}", "z", case_id="abc"),
    ],
)
def test_to_dict_round_trips_through_json(fact: Fact) -> None:
    data = fact.to_dict()
    assert set(data) >= {"prompt", "subject", "target"}
    assert ("target_true" in data) == (fact.target_true is not None)
    assert ("case_id" in data) == (fact.case_id is not None)
    assert Fact.from_dict(json.loads(json.dumps(data))) == fact


# -- check_facts ---------------------------------------------------------------------------------------


def test_check_facts_normalises_and_keeps_order() -> None:
    items: list[Fact | Mapping[str, Any]] = [
        DARRIEUX,
        {"requested_rewrite": ROME_REQUEST | {"subject": "Marie Curie"}, "case_id": 1},
        {"prompt": "The capital of {} is", "subject": "France", "target": "Lyon"},
    ]
    out = check_facts(iter(items))  # any iterable
    assert all(isinstance(f, Fact) for f in out)
    assert out[0] is DARRIEUX
    assert [f.subject for f in out] == ["Danielle Darrieux", "Marie Curie", "France"]
    assert out[1].case_id == 1


def test_check_facts_allows_shared_subjects_and_prompts() -> None:
    facts = [
        Fact("The capital of {} is", "France", "Lyon"),
        Fact("The language of {} is", "France", "German"),  # same subject, other relation
        Fact("The capital of {} is", "Spain", "Lyon"),  # same relation and target, other subject
    ]
    assert check_facts(facts) == facts


def test_check_facts_empty() -> None:
    with pytest.raises(FactError, match="no facts"):
        check_facts([])


def test_check_facts_names_the_bad_row() -> None:
    items = [
        DARRIEUX,
        {"prompt": "The capital of {} is", "subject": "France", "target": "Lyon"},
        {"prompt": "x"},
    ]
    with pytest.raises(FactError) as info:
        check_facts(items)
    assert info.value.row == 2 and str(info.value).startswith("fact 2:")
    with pytest.raises(FactError) as info:
        check_facts([DARRIEUX, "not a fact"])  # type: ignore[list-item]
    assert info.value.row == 1


def test_check_facts_duplicates_and_conflicts() -> None:
    facts = [
        Fact("The capital of {} is", "France", "Lyon"),
        Fact("The capital of {} is", "Spain", "Lyon"),
        Fact("The capital of {} is", " France ", " Lyon"),  # same request up to surrounding spaces
        Fact("The capital of {} is", "Spain", "Madrid"),
    ]
    with pytest.raises(FactError) as info:
        check_facts(facts)
    message = str(info.value)
    assert info.value.row == 2  # the first repeat, not the original
    assert message.startswith("2 repeated")
    assert "fact 2 duplicates fact 0" in message
    assert "fact 3 conflicts with fact 1" in message


def test_check_facts_lists_at_most_five_problems() -> None:
    facts = [Fact("The capital of {} is", "France", f"City{i}") for i in range(9)]
    with pytest.raises(FactError) as info:
        check_facts(facts)
    message = str(info.value)
    assert message.startswith("8 repeated")
    assert message.count("conflicts with fact 0") == 5
    assert message.endswith("and 3 more")
    assert info.value.row == 1


def test_check_facts_does_not_mutate_its_input() -> None:
    record = {"requested_rewrite": dict(ROME_REQUEST), "case_id": 3}
    snapshot = json.dumps(record, sort_keys=True)
    check_facts([record])
    assert json.dumps(record, sort_keys=True) == snapshot
