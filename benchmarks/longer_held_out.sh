#!/bin/bash
# The default against its candidates on SmolLM2's 64-window held-out text (docs/results.md, "Session 20").
#
#   bash benchmarks/longer_held_out.sh PRUNER "CALIBRATION SEEDS" "SOLVER SEEDS" [OUT]
#   bash benchmarks/longer_held_out.sh sparsegpt "0 1 2" "0 1 2" /tmp/held_out_64
#
# Per calibration seed: the pruner alone and the ria and greedy methods at each solver seed, each made by
# end_to_end_ablation.py --selection-only into its own checkpoint folder (JOBS at a time, 1 thread each), then all
# of that seed's checkpoints evaluated together by evaluate_checkpoints.py (one dense pass) into OUT/rows_*.json.
# The default's model in a run is one of these (its choice depends on the calibration tokens only): read the rows
# with `solver_seed_pairs.py OUT/rows_*.json --choices <the 16-window rows naming the default's choices>`.
# LABELS (one end_to_end_ablation.py row label per line) replaces that list of rows, e.g.
#   LABELS="method greedy, wanda_energy score, solver seed 0" bash benchmarks/longer_held_out.sh wanda "0 1 2" 0
set -euo pipefail
pruner=$1; calibration_seeds=$2; solver_seeds=$3; out=${4:-/tmp/held_out_64}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}

labels() {
  if [ -n "${LABELS:-}" ]; then printf '%s\n' "$LABELS"; return; fi
  echo "pruner alone"
  for k in $solver_seeds; do
    if [ "$k" = 0 ]; then echo ria; echo greedy
    else echo "method ria, solver seed $k"; echo "method greedy, solver seed $k"; fi
  done
}

folder() { echo "$out/checkpoints/${pruner}_s$1_$(echo "$2" | tr -c 'a-zA-Z0-9\n' '_')"; }

compress() {  # calibration seed, label
  OMP_NUM_THREADS=1 "$python" "$here/end_to_end_ablation.py" --model smollm2-135m --pruner "$pruner" --seeds "$1" \
    --threads 1 --only "$2" --selection-only --checkpoint-dir "$(folder "$1" "$2")" \
    > "$(folder "$1" "$2").log" 2>&1  # --selection-only writes no tables: the log holds the row
}

mkdir -p "$out/checkpoints"
running=0
for seed in $calibration_seeds; do
  while read -r label; do
    compress "$seed" "$label" &
    running=$((running + 1))
    if [ "$running" -ge "${JOBS:-1}" ]; then wait -n; running=$((running - 1)); fi
  done < <(labels)
done
while [ "$running" -gt 0 ]; do wait -n; running=$((running - 1)); done
for seed in $calibration_seeds; do
  checkpoints=()
  while read -r label; do checkpoints+=(--checkpoint "$label=$(folder "$seed" "$label")"); done < <(labels)
  OMP_NUM_THREADS=1 "$python" "$here/evaluate_checkpoints.py" --seed "$seed" --eval-windows 64 "${checkpoints[@]}" \
    --output "$out/rows_${pruner}_s${seed}.json"
done
