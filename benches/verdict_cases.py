"""The fixed order of CounterFact cases the verdict sweep edits on SmolLM2 (docs/benchmarks.md).

    python benches/verdict_cases.py --data ../shared/data/counterfact/counterfact_easyedit_train_10000.json \\
        --out bench-results/verdict

writes ``cases.jsonl`` (the EditCases, evaluation prompts included: ``bench_real.py --data``),
``facts.jsonl`` (their edits: ``eamet edit --facts``, for the residual passes) and ``corpus.txt`` (the texts
of records after the first ``--corpus-from`` cases, a cheap C for passes whose solve does not matter).

Order: the 454 shipped cases SmolLM2 knows, then the records of ``--data`` in file order. A record whose
subject and prompt already appeared is dropped (CounterFact repeats 77 pairs, some with other targets,
and the shipped cases come from the same files): the editor refuses two edits of one subject+prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import eamet.models
from eamet.base.records import cases_texts, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CounterFact JSON (EasyEdit or ROME form)")
    parser.add_argument("--model", default="smollm2", help="whose shipped known cases come first")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--corpus-from", type=int, default=4096, help="corpus.txt: texts of cases from here")
    args = parser.parse_args()
    seen: set[tuple[str, str]] = set()
    ordered = []
    for case in [*eamet.models.known_facts(args.model), *load_dataset("counterfact", args.data)]:
        key = (case.rewrite.subject.strip(), case.rewrite.prompt)
        if key not in seen:
            seen.add(key)
            ordered.append(case)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "cases.jsonl").open("w", encoding="utf-8") as handle:
        for case in ordered:
            handle.write(json.dumps(case.to_dict(), ensure_ascii=False) + "\n")
    with (args.out / "facts.jsonl").open("w", encoding="utf-8") as handle:
        for case in ordered:
            handle.write(json.dumps(case.rewrite.to_dict(), ensure_ascii=False) + "\n")
    texts = cases_texts(ordered[args.corpus_from :])
    (args.out / "corpus.txt").write_text(
        "\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8"
    )
    print(
        f"{len(ordered)} cases ({len(seen)} distinct subject+prompt) -> {args.out}; corpus {len(texts)} texts"
    )


if __name__ == "__main__":
    main()
