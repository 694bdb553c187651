#!/usr/bin/env bash
# The verdict's cells at one N while the residual passes run (docs/benchmarks.md, "The verdict at scale"):
# stops both chains, runs the cells as two one-thread processes side by side (MEMIT's and EAMET as
# specified's in one, the gated EAMET's in the other), joins them into OUT_DIR/cells-N.json and lets the
# chains go on — also when the cells fail or are interrupted.
#
#   bash benches/verdict/cells_beside_passes.sh CASES_DIR OUT_DIR N
#
# CASES_DIR, OUT_DIR, and the environment (PYTHON, EAMET, PASSES, STORE, LEVERAGE_TARGET): as cells.sh.
# The two halves write OUT_DIR/part-memit and OUT_DIR/part-gated (resumable, like cells.sh); the join
# keeps every cell already in OUT_DIR/cells-N.json. A cell takes ~8 min at N = 512 (one thread).
set -euo pipefail
cases=$1 out=$2 n=$3
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
chains='eamet-verdict/(memit|eamet|eamet-gated)-'  # the passes' eamet processes (their --out paths)

pkill -STOP -f "$chains" || echo "# no residual pass is running"
trap 'pkill -CONT -f "$chains" || true' EXIT
mkdir -p "$out/part-memit" "$out/part-gated"
# The capacity report once, for both halves (cells.sh computes it when missing; CELLS matches no cell).
CELLS='(none)' bash "$here/cells.sh" "$cases" "$out" "$n"
for part in memit gated; do
  cp "$out/capacity-$n.json" "$out/part-$part/"
  [ ! -e "$out/cells-$n.json" ] || [ -e "$out/part-$part/cells-$n.json" ] || cp "$out/cells-$n.json" "$out/part-$part/"
done
export OMP_NUM_THREADS=1 EAMET_NUM_THREADS=1
BENCH_ARGS="--threads 1 --allow-busy ${BENCH_ARGS:-}"
export BENCH_ARGS
CELLS='(memit|eamet)-.*' bash "$here/cells.sh" "$cases" "$out/part-memit" "$n" > "$out/part-memit/cells-$n.log" 2>&1 &
memit_pid=$!
CELLS='gated-.*' bash "$here/cells.sh" "$cases" "$out/part-gated" "$n" > "$out/part-gated/cells-$n.log" 2>&1 &
gated_pid=$!
echo "# cells at N = $n: $out/part-memit/cells-$n.log, $out/part-gated/cells-$n.log"
status=0
wait "$memit_pid" || status=$?
wait "$gated_pid" || status=$?
joined=()
for f in "$out/cells-$n.json" "$out/part-memit/cells-$n.json" "$out/part-gated/cells-$n.json"; do
  [ ! -e "$f" ] || joined+=("$f")
done
if [ ${#joined[@]} -gt 0 ]; then
  tmp=$(mktemp "$out/cells-$n.XXXXXX")
  "$python" "$here/../sweeps.py" "${joined[@]}" --json "$tmp"
  mv "$tmp" "$out/cells-$n.json"
  echo "# joined into $out/cells-$n.json"
fi
exit "$status"
