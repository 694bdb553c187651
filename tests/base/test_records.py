"""Evaluation records: the dataset loaders on small fixture files in every form, and their errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import eamet
from eamet.base.errors import DatasetError, FactError, ParameterError
from eamet.base.facts import Fact
from eamet.base.records import (
    EditCase,
    case_from_record,
    cases_sharing_subjects,
    counterfact_case,
    dataset_kind,
    load_dataset,
    zsre_case,
)
from eamet.sandbox import World

ROME: list[dict[str, Any]] = [
    {
        "case_id": 7,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux, a native", "Danielle Darrieux spoke"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in"],
    },
    {
        "case_id": 9,
        "requested_rewrite": {
            "prompt": "{} plays the {music}",  # braces in record text are text, not a format field
            "subject": "Toko Yasuda",
            "target_new": {"str": "piano"},
            "target_true": {"str": "guitar"},
        },
        "paraphrase_prompts": [],
        "neighborhood_prompts": [],
        "generation_prompts": [],
    },
]
EASYEDIT_CF: list[dict[str, Any]] = [
    {
        "case_id": 7,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux spoke",
        "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French",
    }
]
MEND_ZSRE: list[dict[str, Any]] = [
    {
        "subject": "IAAF Combined Events Challenge",
        "src": "When was the inception of IAAF Combined Events Challenge?",
        "pred": "2011",
        "rephrase": "When was the IAAF Combined Events Challenge launched?",
        "alt": "2006",
        "answers": ["1998", "1999"],
        "loc": "nq question: what is the name of the last episode of spongebob",
        "loc_ans": "The String",
        "cond": "2011 >> 2006 || When was the inception of IAAF Combined Events Challenge?",
    },
    {
        "subject": "Kim {0} Lee",  # braces again; the subject twice: only the first becomes the slot
        "src": "Who is the father of Kim {0} Lee, and of Kim {0} Lee's sister?",
        "rephrase": "Who fathered Kim {0} Lee?",
        "answers": ["Park"],
        "loc": "nq question: who wrote the book",
        "loc_ans": "Anne",
    },
]
EASYEDIT_ZSRE: list[dict[str, Any]] = [
    {
        "case_id": 3,
        "prompt": "When was the inception of IAAF Combined Events Challenge?",
        "subject": "IAAF Combined Events Challenge",
        "target_new": "2006",
        "ground_truth": ["1998"],
        "rephrase_prompt": "When was the IAAF Combined Events Challenge launched?",
        "locality_prompt": "nq question: who wrote the book",
        "locality_ground_truth": "Anne",
    }
]


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_rome_counterfact(tmp_path: Path) -> None:
    cases = load_dataset("counterfact", write_json(tmp_path / "cf.json", ROME))
    assert [c.case_id for c in cases] == [7, 9] and all(c.kind == "counterfact" for c in cases)
    first = cases[0]
    assert first.rewrite == Fact("The mother tongue of {} is", "Danielle Darrieux", "English", "French", 7)
    assert first.paraphrases == tuple(ROME[0]["paraphrase_prompts"])
    assert first.neighborhood == (
        ("The mother tongue of Léon Blum is", "French"),
        ("Michel Rocard is a native speaker of", "French"),
    )
    assert first.generation_prompts == tuple(ROME[0]["generation_prompts"])
    second = cases[1]
    assert second.rewrite.text == "Toko Yasuda plays the {music}"
    assert (second.paraphrases, second.neighborhood, second.generation_prompts) == ((), (), ())
    # World.from_records shares the parser.
    assert World.from_records(ROME).cases == tuple(cases)
    assert load_dataset("counterfact", tmp_path / "cf.json", limit=1) == cases[:1]


def test_easyedit_counterfact_matches_the_rome_form(tmp_path: Path) -> None:
    (flat,) = load_dataset("counterfact", write_json(tmp_path / "cf.json", EASYEDIT_CF))
    rome = counterfact_case(ROME[0], 0)
    assert flat.rewrite == rome.rewrite and flat.kind == "counterfact"
    assert flat.paraphrases == ("Danielle Darrieux spoke",)
    assert flat.neighborhood == rome.neighborhood[:1]
    assert flat.generation_prompts == ()


def test_mend_zsre(tmp_path: Path) -> None:
    first, second = load_dataset("zsre", write_json(tmp_path / "zsre.json", MEND_ZSRE))
    assert first == EditCase(
        case_id=0,
        rewrite=Fact("When was the inception of {}?", "IAAF Combined Events Challenge", "1998", None, 0),
        paraphrases=("When was the IAAF Combined Events Challenge launched?",),
        # the reference puts "?" after the loc question
        neighborhood=(("nq question: what is the name of the last episode of spongebob?", "The String"),),
        kind="zsre",
    )
    assert second.case_id == 1
    assert second.rewrite.prompt == "Who is the father of {}, and of Kim {0} Lee's sister?"
    assert second.rewrite.text == MEND_ZSRE[1]["src"]
    assert second.paraphrases == ("Who fathered Kim {0} Lee?",)


def test_easyedit_zsre(tmp_path: Path) -> None:
    (case,) = load_dataset("zsre", write_json(tmp_path / "zsre.json", EASYEDIT_ZSRE))
    assert case.kind == "zsre" and case.case_id == 3
    assert case.rewrite.prompt == "When was the inception of {}?"
    assert (case.rewrite.target, case.rewrite.target_true) == ("2006", "1998")
    assert case.neighborhood == (("nq question: who wrote the book", "Anne"),)


def test_jsonl_in_every_form(tmp_path: Path) -> None:
    own = EditCase(5, Fact("{} speaks", "Ada", "Welsh", "English"), ("Ada talks",), (("Bo speaks", "Irish"),))
    zsre_own = EditCase(6, Fact("Who made {}?", "X1", "Bob"), kind="zsre", generation_prompts=("X1 is",))
    lines = [
        ROME[0],
        EASYEDIT_CF[0],
        MEND_ZSRE[0],
        Fact("The capital of {} is", "Narnia", "Paris", case_id=4).to_dict(),
        own.to_dict(),
        zsre_own.to_dict(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in lines[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in lines[3:])
    )
    cases = load_dataset("jsonl", path)
    assert [c.kind for c in cases] == [
        "counterfact",
        "counterfact",
        "zsre",
        "counterfact",
        "counterfact",
        "zsre",
    ]
    assert cases[0] == counterfact_case(ROME[0], 0)
    assert cases[1] == counterfact_case(EASYEDIT_CF[0], 1)
    assert cases[2] == zsre_case(MEND_ZSRE[0], 2)
    bare = cases[3]
    assert bare.case_id == 4 and bare.rewrite.target_true is None
    assert (bare.paraphrases, bare.neighborhood) == ((), ())
    assert cases[4] == own and cases[5] == zsre_own
    assert load_dataset("jsonl", path, limit=4) == cases[:4]
    assert eamet.load_dataset is load_dataset


def test_edit_case_round_trip_and_checks() -> None:
    case = counterfact_case(ROME[0], 0)
    assert EditCase.from_dict(json.loads(json.dumps(case.to_dict()))) == case
    plain = EditCase(1, Fact("{} is", "A", "b"))
    assert set(plain.to_dict()) == {"case_id", "rewrite", "paraphrases", "neighborhood"}  # defaults omitted
    with pytest.raises(FactError, match="kind"):
        EditCase(1, Fact("{} is", "A", "b"), kind="wikirecent")  # type: ignore[arg-type]
    with pytest.raises(FactError, match="case_id"):
        EditCase("1", Fact("{} is", "A", "b"))  # type: ignore[arg-type]
    with pytest.raises(FactError, match="rewrite"):
        EditCase.from_dict({"case_id": 1})
    with pytest.raises(FactError, match="two strings"):
        EditCase.from_dict({**plain.to_dict(), "neighborhood": [["p", 3]]})


def test_world_keeps_generation_prompts_through_its_dict() -> None:
    world = World.from_records(ROME)
    assert world.cases[0].generation_prompts == tuple(ROME[0]["generation_prompts"])
    assert World.from_dict(json.loads(json.dumps(world.to_dict()))) == world


@pytest.mark.parametrize(
    ("kind", "records", "match"),
    [
        ("counterfact", [ROME[0], {**ROME[0], "requested_rewrite": {"prompt": "{} is"}}], "subject"),
        ("counterfact", [EASYEDIT_CF[0], {**EASYEDIT_CF[0], "ground_truth": None}], "target_true"),
        ("counterfact", [ROME[0], {**ROME[0], "generation_prompts": [1]}], "list of strings"),
        ("counterfact", [ROME[0], "not a record"], "JSON object"),
        ("zsre", [MEND_ZSRE[0], {**MEND_ZSRE[0], "subject": "Nobody"}], "not in the src"),
        ("zsre", [MEND_ZSRE[0], {**MEND_ZSRE[0], "answers": []}], "answers"),
        ("zsre", [MEND_ZSRE[0], {**MEND_ZSRE[0], "loc_ans": None}], "loc"),
        ("zsre", [MEND_ZSRE[0], {**MEND_ZSRE[0], "case_id": "x"}], "case_id"),
    ],
)
def test_a_bad_record_is_named(tmp_path: Path, kind: str, records: list[Any], match: str) -> None:
    path = write_json(tmp_path / "data.json", records)
    with pytest.raises(FactError, match=match) as info:
        load_dataset(kind, path)
    assert info.value.row == 1 and "record 1" in str(info.value) and info.value.path == str(path)


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="unknown dataset kind") as info:
        load_dataset("wikirecent", tmp_path / "x.json")
    assert info.value.argument == "kind"
    with pytest.raises(ParameterError, match="limit"):
        load_dataset("counterfact", tmp_path / "x.json", limit=0)
    missing = tmp_path / "missing.json"
    with pytest.raises(DatasetError, match="does not exist") as file_info:
        load_dataset("counterfact", missing)
    assert file_info.value.path == str(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"case_id": 1,')
    with pytest.raises(DatasetError, match="not valid JSON") as file_info:
        load_dataset("zsre", broken)
    assert file_info.value.path == str(broken)
    with pytest.raises(DatasetError, match="JSON list"):
        load_dataset("counterfact", write_json(tmp_path / "obj.json", {"data": ROME}))
    with pytest.raises(DatasetError, match="no records"):
        load_dataset("counterfact", write_json(tmp_path / "empty.json", []))
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(ROME[0]) + "\n\n{oops\n")
    with pytest.raises(DatasetError, match="line 3") as file_info:
        load_dataset("jsonl", lines)
    assert (file_info.value.row, file_info.value.path) == (1, str(lines))
    lines.write_text(
        json.dumps(ROME[0]) + "\n" + json.dumps({"prompt": "no slot", "subject": "X", "target": "y"})
    )
    with pytest.raises(FactError, match="record 1") as fact_info:
        load_dataset("jsonl", lines)
    assert fact_info.value.row == 1


def test_case_from_record_rejects_non_mappings() -> None:
    with pytest.raises(FactError, match="record 4") as info:
        case_from_record(["a", "list"], 4)  # type: ignore[arg-type]
    assert info.value.row == 4


def test_cases_sharing_subjects() -> None:
    def case(i: int, subject: str) -> EditCase:
        return EditCase(i, Fact("{} likes", subject, f"thing{i}"))

    cases = [case(0, "A"), case(1, "B"), case(2, "A "), case(3, "C"), case(4, "B"), case(5, "A")]
    assert [c.case_id for c in cases_sharing_subjects(cases, 2)] == [0, 1, 2, 4, 5]
    assert [c.case_id for c in cases_sharing_subjects(cases, 3)] == [0, 2, 5]
    assert cases_sharing_subjects(cases, 1) == cases
    assert cases_sharing_subjects(cases, 4) == []
    with pytest.raises(ParameterError, match="per_subject"):
        cases_sharing_subjects(cases, 0)


def test_the_kind_of_a_dataset_file_without_one_given() -> None:
    assert dataset_kind("facts.jsonl") == dataset_kind(Path("a/b.jsonl")) == "jsonl"
    assert dataset_kind("counterfact.json") == dataset_kind("data.jsonl.bak") == "counterfact"
