#!/usr/bin/env bash
# The verdict sweep's residual passes on SmolLM2 (docs/benchmarks.md, "The verdict at scale"): each method's
# residuals for the first N facts of benches/verdict_cases.py's order, into one residual store. Resumable:
# rerun the same command and every stored residual is taken from the store; only the rest is computed.
#
#   bash benches/verdict/residual_passes.sh EAMET_BIN CASES_DIR [N ...]
#
# EAMET_BIN: the `eamet` command of an installed copy in its own venv (the sweep must not run the working
# tree); CASES_DIR: the output of `python benches/verdict_cases.py --out CASES_DIR` (facts.jsonl, corpus.txt).
# N: the prefix sizes, in order (default 128 256 512 1024 2048). Two chains run side by side, one thread
# each: MEMIT to the largest N and then EAMET as the paper specifies it to SPECIFIED_LAST (default 512,
# which covers every N below it: its curve is clear from N = 128 on, and each further doubling costs hours
# of the chain that MEMIT needs); EAMET with eamet's gate to the largest N. On this 2-core VM one residual
# step gains ~23 % from a second thread (the products are 42 rows deep), so two one-thread chains give
# 1.64× the throughput of one two-thread chain (docs/benchmarks.md). Each chain goes N by N, and a larger
# N reuses the smaller one's residuals (an EAMET residual depends only on the facts before it). EAMET as
# specified comes last because issue 19 asks for MEMIT and the gated EAMET at the largest N first when
# machine time is short, and the specified loss's curve is clear early (it stalls on this model). CHAINS=1
# runs the same passes one after another in one chain (two threads). The store is benches/verdict/store
# (committed: 2 × 576 float32 per fact, ~6 KB), or STORE. Each pass ends with a solve at the preset's λ (C from
# CASES_DIR/corpus.txt: the solve does not matter here, the residuals do; the sweep re-solves them). A
# pass that ended writes NAME-N.store (the store it filled) beside its JSON, and is skipped when run
# again into the same store, so a resumed sweep goes straight to the N it stopped in.
# On a machine with CUDA every pass runs there (the CLI's default device); use CHAINS=1 (one GPU).
set -euo pipefail
eamet=$1 cases=$2
shift 2
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(128 256 512 1024 2048)
here=$(cd "$(dirname "$0")" && pwd)
store=${STORE:-$here/store}
out=${VERDICT_OUT:-/tmp/eamet-verdict}
mkdir -p "$out"

pass() {  # NAME N METHOD [extra eamet edit options]
  local name=$1 n=$2 method=$3
  shift 3
  local done_mark="$out/$name-$n.store"
  if [ "$(cat "$done_mark" 2>/dev/null)" = "$store" ] && [ -s "$out/$name-$n.json" ]; then
    # The pass ended with every residual in this store; re-solving them would cost minutes.
    echo "== $name: $n facts done before, into $store"
    return
  fi
  local tmp
  tmp=$(mktemp "$out/facts-$n.XXXXXX")  # the other chain may be reading facts-N.jsonl: replace it whole
  head -n "$n" "$cases/facts.jsonl" > "$tmp"
  mv "$tmp" "$out/facts-$n.jsonl"
  echo "== $name: $n facts ($(date -u +%FT%TZ))"
  "$eamet" edit --model smollm2 --facts "$out/facts-$n.jsonl" --method "$method" "$@" \
    --residual-store "$store" --corpus "$cases/corpus.txt" --samples 2000 \
    --out "$out/$name-$n.safetensors" --json "$out/$name-$n.json"
  echo "$store" > "$done_mark"
}

specified_last=${SPECIFIED_LAST:-512}
memit_chain() {
  for n in "${sizes[@]}"; do pass memit "$n" memit; done
  pass eamet "$specified_last" eamet --align-below-nll off
}
gated_chain() {
  for n in "${sizes[@]}"; do pass eamet-gated "$n" eamet --align-below-nll 0.1; done
}
if [ "${CHAINS:-2}" = 1 ]; then
  memit_chain
  gated_chain
else
  export OMP_NUM_THREADS=1 EAMET_NUM_THREADS=1
  memit_chain > "$out/memit-chain.log" 2>&1 &
  memit_pid=$!
  gated_chain > "$out/gated-chain.log" 2>&1 &
  gated_pid=$!
  echo "two chains: MEMIT then EAMET as specified (pid $memit_pid, $out/memit-chain.log), gated EAMET (pid $gated_pid, $out/gated-chain.log)"
  status=0
  wait "$memit_pid" || status=$?
  wait "$gated_pid" || status=$?
  exit "$status"
fi
