#!/usr/bin/env bash
# The verdict sweep's residual passes on SmolLM2 (docs/benchmarks.md, "The verdict at scale"): each method's
# residuals for the first N facts of benches/verdict_cases.py's order, into one residual store. Resumable:
# rerun the same command and every stored residual is taken from the store; only the rest is computed.
#
#   bash benches/verdict/residual_passes.sh EAMET_BIN CASES_DIR [N ...]
#
# EAMET_BIN: the `eamet` command of an installed copy in its own venv (the sweep must not run the working
# tree); CASES_DIR: the output of `python benches/verdict_cases.py --out CASES_DIR` (facts.jsonl, corpus.txt).
# N: the prefix sizes, in order (default 128 256 512 1024 2048). MEMIT and EAMET with eamet's gate take
# turns at each N, so that every N is complete for both before the next starts, and a larger N reuses the
# smaller one's residuals (an EAMET residual depends only on the facts before it). EAMET as the paper
# specifies it runs at the N of SPECIFIED_FIRST (default 128) in turn, and to SPECIFIED_LAST (default 1024,
# which covers every N below it) only after the others reach the largest N: issue 19 asks for MEMIT and the
# gated EAMET at the largest N first when machine time is short, and the specified loss's curve is clear
# early (it stalls on this model). The store is benches/verdict/store (committed:
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

specified_first=${SPECIFIED_FIRST:-128} specified_last=${SPECIFIED_LAST:-1024}
for n in "${sizes[@]}"; do
  pass memit "$n" memit
  pass eamet-gated "$n" eamet --align-below-nll 0.1
  [ "$n" -gt "$specified_first" ] || pass eamet "$n" eamet --align-below-nll off
done
pass eamet "$specified_last" eamet --align-below-nll off
