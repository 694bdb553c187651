#!/usr/bin/env bash
# The verdict's cells on SmolLM2 (docs/benchmarks.md, "The verdict at scale"): at each N, every method at
# λ 558, λ 2093 and the λ the capacity report picks, on blocks 3-4 and on block 4 alone. Every residual
# comes from the committed store (benches/verdict/store), so a cell is keys, a solve and the evaluation;
# a method whose residual pass has not reached N is left out (its pass's JSON is the proof it has).
# Resumable: the cells already in OUT_DIR/cells-N.json are kept (merged) and not run again.
#
#   bash benches/verdict/cells.sh CASES_DIR OUT_DIR N [N ...]
#
# CASES_DIR: the output of `python benches/verdict_cases.py --out CASES_DIR`; OUT_DIR: where the cells go
# (cells-N.json, capacity-N.json). Environment: PYTHON (default python3: the working tree's, with eamet
# installed), EAMET (default eamet), PASSES (the residual passes' JSON, default /tmp/eamet-verdict, as
# residual_passes.sh writes them), STORE (default benches/verdict/store), LEVERAGE_TARGET (default 0.5:
# the capacity report's λ is the largest whose mean leverage per block is still ≥ it; 0.5 is reachable at
# every N of the sweep, where rank/N caps the leverage at λ = 0), CELLS (a regular expression: run only
# the cells whose names match, e.g. 'gated-.*'), and BENCH_ARGS (more bench_real.py options, e.g.
# --allow-busy).
#
# Each cell evaluates every edited case up to N = 512 and 512 spread evenly over the N above it (a cell's
# evaluation is ~0.6 s per case on 2 cores: all 2048 would be ~20 min per cell).
#
# C for every cell: `model:1000`, the documents SmolLM2 writes itself (cached after the first run), read
# 1000 at a time; the cells' λ and leverage are on that C.
set -euo pipefail
cases=$1 out=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
store=${STORE:-$here/store}
python=${PYTHON:-python3} eamet=${EAMET:-eamet} passes=${PASSES:-/tmp/eamet-verdict}
target=${LEVERAGE_TARGET:-0.5}
mkdir -p "$out"

stored_to() {  # NAME N: whether the pass NAME has stored the residuals of the first N facts
  local name=$1 n=$2 f
  for f in "$passes/$name"-*.json; do
    local m=${f#"$passes/$name"-}
    m=${m%.json}
    # eamet-*.json also matches eamet-gated-*.json: only a pure number is this pass's N
    [[ -e "$f" && "$m" =~ ^[0-9]+$ ]] || continue
    [ "$m" -ge "$n" ] && return 0
  done
  return 1
}

for n in "$@"; do
  head -n "$n" "$cases/facts.jsonl" > "$out/facts-$n.jsonl"
  echo "== capacity, N = $n ($(date -u +%FT%TZ))"
  [ -e "$out/capacity-$n.json" ] || "$eamet" capacity --model smollm2 --facts "$out/facts-$n.jsonl" --method memit --corpus model:1000 \
    --samples 1000 --lambda-for "$target" --json "$out/capacity-$n.json" --no-progress
  read -r cap cap4 < <("$python" -c '
import json, sys
lams = json.load(open(sys.argv[1]))["lambda_for"]["lambdas"]
print(";".join(f"{x:.1f}" for x in lams) + "; " + f"{lams[-1]:.1f};")' "$out/capacity-$n.json")
  variants=() merge=() done_cells=""
  if [ -e "$out/cells-$n.json" ]; then
    cp "$out/cells-$n.json" "$out/cells-$n.prev.json"
    merge=(--merge "$out/cells-$n.prev.json")
    done_cells=$("$python" -c 'import json, sys
print(" ".join(sorted({r["method"] for r in json.load(open(sys.argv[1]))["rows"]})))' "$out/cells-$n.json")
  fi
  add() {  # NAME PASS METHOD[:settings]: a cell, if PASS has reached N and the cell is not done yet
    if [[ " $done_cells " == *" $1 "* ]]; then return 0; fi
    [[ "$1" =~ ^(${CELLS:-.*})$ ]] || return 0
    if stored_to "$2" "$n"; then variants+=(--variant "$1=$3"); else echo "# $1: $2 has not reached N = $n"; fi
  }
  for lam in 558.1 2093.0 cap; do
    both=$lam one="$lam;"
    [ "$lam" != cap ] || { both=$cap one=$cap4; }
    add "memit-$lam" memit "memit:mom2_update_weight=$both"
    add "gated-$lam" eamet-gated "eamet:align_below_nll=0.1,mom2_update_weight=$both"
    add "eamet-$lam" eamet "eamet:align_below_nll=null,mom2_update_weight=$both"
    add "memit-b4-$lam" memit "memit:layers=4;,mom2_update_weight=$one"
    add "gated-b4-$lam" eamet-gated "eamet:align_below_nll=0.1,layers=4;,mom2_update_weight=$one"
  done
  if [ ${#variants[@]} -eq 0 ]; then
    echo "== cells, N = $n: nothing to run"
    continue
  fi
  echo "== cells, N = $n: $((${#variants[@]} / 2)) to run ($(date -u +%FT%TZ))"
  # shellcheck disable=SC2086
  "$python" "$here/../bench_real.py" --model smollm2 --data "$cases/cases.jsonl" --residual-store "$store" \
    --edits "$n" --prefix-lens 0 --corpus model:1000 --eval-cases 512 --eval-spread "${variants[@]}" "${merge[@]}" \
    --json "$out/cells-$n.json" ${BENCH_ARGS:-}
done
