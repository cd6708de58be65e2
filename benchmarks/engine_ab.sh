#!/bin/bash
# The engine's files as they are against another revision's, on one GPU. Run from the repository root:
#
#   bash benchmarks/engine_ab.sh check OLD_DIR OUT           ~5 min: the decoder's and kernels' GPU tests; the
#                                                            logprob gap of both decoders to one learner
#   bash benchmarks/engine_ab.sh speed OLD_DIR OUT [SHAPES]  ~8 min: generation at each size (default 0.5b,1.5b),
#                                                            both revisions; the 0.5B GRPO iteration alternated
#                                                            (other, current, other, current)
#
# OLD_DIR holds the other revision's winnow/engines/kernels.py and static_decode.py (e.g. from
# `git show REV:winnow/engines/static_decode.py`); OUT gets every result (JSON, tables, one log per step). Every
# step has its own time limit, so one that hangs or fails leaves the others' results; the script exits 1
# when any step failed.
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: bash benchmarks/engine_ab.sh check|speed OLD_DIR OUT [SHAPES]"; exit 2; }
part=$1; old_dir=$2; out=$3; shapes=${4:-0.5b,1.5b}
mkdir -p "$out"
here=$PWD
other=/tmp/engine_ab_other
rm -rf "$other" && mkdir -p "$other" && cp -r "$here/winnow" "$here/benchmarks" "$other/" || exit 1
cp "$old_dir/kernels.py" "$old_dir/static_decode.py" "$other/winnow/engines/" || exit 1
failed=()
run() {  # run NAME SECONDS ROOT CMD...: CMD in ROOT with ROOT's winnow, its output in OUT/NAME.log
  local name=$1 seconds=$2 root=$3 status; shift 3
  (cd "$root" && PYTHONPATH="${PYTHONPATH:-}:$root:$root/benchmarks" timeout "$seconds" "$@") > "$out/$name.log" 2>&1
  status=$?
  echo "$name: exit $status ($(tail -1 "$out/$name.log" | cut -c1-150))"
  [ $status -eq 0 ] || failed+=("$name")
}
if [ "$part" = check ]; then
  run gpu_tests 240 "$here" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    tests/test_static_decode.py -m "slow or not slow"
  run engine_gap 200 "$here" python3 benchmarks/engine_gap.py --other "$other/winnow/engines/static_decode.py" \
    --out "$out/engine_gap.json"
elif [ "$part" = speed ]; then
  for side in other current; do
    root=$here; [ $side = other ] && root=$other
    run "gen_$side" 200 "$root" python3 benchmarks/generate_matrix.py --engine winnow --shapes "$shapes" \
      --out "$out/gen_$side.json"
  done
  for i in 1 2; do
    for side in other current; do
      root=$here; [ $side = other ] && root=$other
      run "grpo_${side}_$i" 110 "$root" python3 benchmarks/grpo_iteration.py --share-prompts \
        --micro-batch-tokens 81920 --out "$out/grpo_${side}_$i.json"
    done
  done
else
  echo "usage: bash benchmarks/engine_ab.sh check|speed OLD_DIR OUT [SHAPES]"; exit 2
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (their logs are in $out)"; exit 1
fi
