#!/usr/bin/env bash
# One GRPO iteration, winnow vs TRL GRPOTrainer (no vLLM), in one go on one GPU (issue 5).
#
#   bash benchmarks/run_gpu_benchmark.sh [OUT_DIR]        # default OUT_DIR: $OUT, else benchmarks/results
#   CPU=1 bash benchmarks/run_gpu_benchmark.sh /tmp/out   # the CPU mode: tiny model, seconds (smoke test)
#
# Needs trl (1.16.0 measured) and datasets besides winnow's own dependencies. Where they are missing (the
# device machine has no network), put their wheels in .whl/ (trl, datasets, dill, multiprocess: see
# benchmarks/NOTES.md) and this installs them into /tmp/site first.
# Writes winnow_grpo.json, trl_grpo.json, grpo_benchmark.json and grpo_benchmark.md into OUT_DIR.
set -o pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import trl, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
MODE=()
[ "${CPU:-0}" = 1 ] && MODE=(--cpu)
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-540}   # whole script, so that a 600 s device call always ends with a report
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv > "$OUT_DIR/nvidia_smi.csv"

python3 benchmarks/grpo_iteration.py "${MODE[@]}" --out "$OUT_DIR/winnow_grpo.json" \
  || { echo "winnow failed with compilation on; again without"; \
       python3 benchmarks/grpo_iteration.py "${MODE[@]}" --no-compile --out "$OUT_DIR/winnow_grpo.json"; } || exit 1
# TRL stops after the step that would leave too little budget for another (at least one measured step).
TRL_BUDGET=$((TOTAL_BUDGET_S - SECONDS - 45))
echo "TRL budget: ${TRL_BUDGET}s (${SECONDS}s used)"
python3 benchmarks/trl_grpo_iteration.py "${MODE[@]}" --out "$OUT_DIR/trl_grpo.json" --budget-s "$TRL_BUDGET"
python3 benchmarks/grpo_report.py "$OUT_DIR/winnow_grpo.json" "$OUT_DIR/trl_grpo.json" \
  --json "$OUT_DIR/grpo_benchmark.json" --md "$OUT_DIR/grpo_benchmark.md"
echo "done in ${SECONDS}s"
