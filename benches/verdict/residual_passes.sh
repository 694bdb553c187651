#!/usr/bin/env bash
# The verdict sweep's residual passes on SmolLM2 (docs/benchmarks.md, "The verdict at scale"): each method's
# residuals for the first N facts of benches/verdict_cases.py's order, into one residual store. Resumable:
# rerun the same command and every stored residual is taken from the store; only the rest is computed.
#
#   bash benches/verdict/residual_passes.sh EAMET_BIN CASES_DIR [N ...]
#
# EAMET_BIN: the `eamet` command of an installed copy in its own venv (the sweep must not run the working
# tree); CASES_DIR: the output of `python benches/verdict_cases.py --out CASES_DIR` (facts.jsonl, corpus.txt).
# N: the prefix sizes, in order (default 128 256 512 1024 2048). The methods take turns at each N — MEMIT,
# EAMET with eamet's gate, EAMET as the paper specifies it (to 1024 only: issue 19) — so that every N is
# complete for all of them before the next starts, and a larger N reuses the smaller one's residuals (an
# EAMET residual depends only on the facts before it). The store is benches/verdict/store (committed:
# 2 × 576 float32 per fact, ~6 KB). Each pass ends with a solve at the preset's λ (C from
# CASES_DIR/corpus.txt: the solve does not matter here, the residuals do; the sweep re-solves them).
set -euo pipefail
eamet=$1 cases=$2
shift 2
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(128 256 512 1024 2048)
here=$(cd "$(dirname "$0")" && pwd)
store=$here/store
out=${VERDICT_OUT:-/tmp/eamet-verdict}
mkdir -p "$out"

pass() {  # NAME N METHOD [extra eamet edit options]
  local name=$1 n=$2 method=$3
  shift 3
  head -n "$n" "$cases/facts.jsonl" > "$out/facts-$n.jsonl"
  echo "== $name: $n facts ($(date -u +%FT%TZ))"
  "$eamet" edit --model smollm2 --facts "$out/facts-$n.jsonl" --method "$method" "$@" \
    --residual-store "$store" --corpus "$cases/corpus.txt" --samples 2000 \
    --out "$out/$name-$n.safetensors" --json "$out/$name-$n.json"
}

for n in "${sizes[@]}"; do
  pass memit "$n" memit
  pass eamet-gated "$n" eamet --align-below-nll 0.1
  [ "$n" -gt 1024 ] || pass eamet "$n" eamet --align-below-nll off
done
