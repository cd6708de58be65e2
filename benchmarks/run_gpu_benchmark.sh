#!/usr/bin/env bash
# One GRPO iteration, three sides on one GPU (issues 5 and 13): winnow with its own engine, winnow with the vllm
# engine, and TRL GRPOTrainer (no vLLM); then generation alone at the 1.5B and 7B shapes (both engines).
#
#   bash benchmarks/run_gpu_benchmark.sh [OUT_DIR]        # default OUT_DIR: $OUT, else benchmarks/results
#   CPU=1 bash benchmarks/run_gpu_benchmark.sh /tmp/out   # the CPU mode: tiny model, seconds (smoke test)
#   SIDES="vllm shapes" bash benchmarks/run_gpu_benchmark.sh DIR   # some sides only; the report merges what DIR holds
#
# Sides: winnow, trl, vllm (needs vLLM importable), shapes (generate_shapes.py; vLLM's runs need vLLM).
# Needs trl (1.16.0 measured) and datasets for the TRL side. Where they are missing (the device machine has no
# network), put their wheels in .whl/ (trl, datasets, dill, multiprocess: see benchmarks/NOTES.md) and this
# installs them into /tmp/site first. Writes winnow_grpo.json, vllm_grpo.json, trl_grpo.json, gen_*.json,
# grpo_benchmark.json and grpo_benchmark.md into OUT_DIR.
set -o pipefail
OUT_DIR=${1:-${OUT:-benchmarks/results}}
SIDES=${SIDES:-winnow trl vllm shapes}
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
has() { [[ " $SIDES " == *" $1 "* ]]; }
has_vllm() { python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv > "$OUT_DIR/nvidia_smi.csv"

# vLLM leaves an engine-core process behind if its parent dies, and that child keeps any pipe on its stdout
# open: each vLLM run gets its own process group (killed afterwards), a time limit, and a log file, not a pipe.
run_group() {  # run_group SECONDS LOG COMMAND...
  local limit=$1 log=$2; shift 2
  setsid timeout -k 10 "$limit" "$@" > "$log" 2>&1 &
  local pid=$!
  wait $pid; local rc=$?
  kill -9 -- -$pid 2>/dev/null
  grep -E "^(iteration|RESULT|logprob gap|vllm|Traceback|[A-Za-z]*Error)" "$log" | tail -20
  return $rc
}

if has winnow; then
  python3 benchmarks/grpo_iteration.py "${MODE[@]}" --out "$OUT_DIR/winnow_grpo.json" \
    || { echo "winnow failed with compilation on; again without"; \
         python3 benchmarks/grpo_iteration.py "${MODE[@]}" --no-compile --out "$OUT_DIR/winnow_grpo.json"; } || exit 1
fi
if has vllm && has_vllm; then
  run_group $((TOTAL_BUDGET_S - SECONDS - 20)) "$OUT_DIR/vllm_log.txt" \
    python3 benchmarks/grpo_iteration.py "${MODE[@]}" --engine vllm --out "$OUT_DIR/vllm_grpo.json" \
    || echo "the vLLM side failed: see vllm_log.txt"
fi
if has shapes && [ "${CPU:-0}" != 1 ]; then
  for run in ${SHAPE_RUNS:-vllm:1.5b vllm:7b winnow:1.5b winnow:7b}; do
    left=$((TOTAL_BUDGET_S - SECONDS - 15))
    [ $left -lt 90 ] && { echo "no time left for $run"; continue; }
    [ "${run%%:*}" = vllm ] && ! has_vllm && continue
    run_group $left "$OUT_DIR/gen_${run%%:*}_${run##*:}_log.txt" python3 benchmarks/generate_shapes.py \
      --engine "${run%%:*}" --shape "${run##*:}" --out "$OUT_DIR/gen_${run%%:*}_${run##*:}.json" || echo "$run failed"
  done
fi
if has trl; then
  # Last, with what is left: TRL stops after the step that would leave too little budget for another (at least
  # one measured step).
  TRL_BUDGET=$((TOTAL_BUDGET_S - SECONDS - 45))
  echo "TRL budget: ${TRL_BUDGET}s (${SECONDS}s used)"
  python3 benchmarks/trl_grpo_iteration.py "${MODE[@]}" --out "$OUT_DIR/trl_grpo.json" --budget-s "$TRL_BUDGET"
fi
[ -f "$OUT_DIR/winnow_grpo.json" ] && python3 benchmarks/grpo_report.py "$OUT_DIR/winnow_grpo.json" \
  "$OUT_DIR/trl_grpo.json" --vllm "$OUT_DIR/vllm_grpo.json" --shapes "$OUT_DIR"/gen_*.json \
  --json "$OUT_DIR/grpo_benchmark.json" --md "$OUT_DIR/grpo_benchmark.md"
echo "done in ${SECONDS}s"
