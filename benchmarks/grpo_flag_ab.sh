#!/bin/bash
# The 0.5B GRPO iteration without and with one more flag of grpo_iteration.py, alternated (without, with,
# without, with), on one GPU. Run from the repository root:
#
#   bash benchmarks/grpo_flag_ab.sh OUT FLAG [BASE_FLAGS]     ~5 min
#
# e.g. `bash benchmarks/grpo_flag_ab.sh /tmp/ab --no-forward-while-scoring`. BASE_FLAGS (default
# "--share-prompts --micro-batch-tokens 81920") go to every run. OUT gets each run's JSON and log; a line per run
# gives its phases' medians and its ratio to the floor it measured. Exits 1 when a run failed.
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: bash benchmarks/grpo_flag_ab.sh OUT FLAG [BASE_FLAGS]"; exit 2; }
out=$1; flag=$2; base=${3:---share-prompts --micro-batch-tokens 81920}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-}:$PWD:$PWD/benchmarks"
failed=()
for i in 1 2; do
  for side in without with; do
    extra=""; [ $side = with ] && extra=$flag
    name="grpo_${side}_$i"
    # shellcheck disable=SC2086
    timeout 140 python3 benchmarks/grpo_iteration.py $base $extra --out "$out/$name.json" > "$out/$name.log" 2>&1
    status=$?
    [ $status -eq 0 ] || { failed+=("$name"); echo "$name: exit $status ($(tail -1 "$out/$name.log"))"; continue; }
    python3 - "$out/$name.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
phases = {k: round(v, 3) for k, v in d["phases_median_s"].items() if k not in ("logprobs", "weight_sync_inner")}
print(sys.argv[2], phases, "x floor", round(d["x_floor"]["end_to_end"], 3),
      "matmul TFLOP/s", round(d["ceilings"]["matmul_tflops"]))
PY
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (their logs are in $out)"; exit 1
fi
