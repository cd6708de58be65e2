#!/bin/bash
# Steps for a GPU machine without network (Python 3.12, torch 2.11 CUDA): wheels and vLLM install trees arrive
# as pieces of one tar (`split` of: gw/*.whl, vNN.tar.xz ...), each vNN.tar.xz holding `common/` (the packages
# vLLM needs that such an image lacks) and/or `vNN/` (one vLLM version's install tree, trimmed to a dense model
# on Hopper). Run from the repository root:
#
#   bash benchmarks/offline_gpu.sh stash DIR...          copy pieces (b.aa, b.ab, ...) from DIR... to /root/stash
#   bash benchmarks/offline_gpu.sh wheels                install gw/*.whl (from the pieces so far) into /root/wsite
#   bash benchmarks/offline_gpu.sh unpack 26             unpack vllm 0.26's tree into /root/site/v26 (+ common/)
#   bash benchmarks/offline_gpu.sh tests 26 GPU OUTFILE [PYTEST ARGS]  the vLLM tests (default: all but Ray's)
#   bash benchmarks/offline_gpu.sh env 26                print the environment for vllm 0.26 (eval it)
#   bash benchmarks/offline_gpu.sh run 26 GPUS SECONDS LOG CMD...   CMD with vllm 0.26 on GPUS ("0" or "0,1")
#
# vLLM runs in its own process group under `timeout`; the group is killed afterwards, so its engine-core child
# cannot keep the call waiting.
set -uo pipefail
STASH=/root/stash
cmd=$1; shift
vllm_env() {
  echo "export PYTHONPATH=/root/site/v$1:/root/site/common:/root/wsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0" \
       "VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 VLLM_ALLOW_INSECURE_SERIALIZATION=1"
}
case $cmd in
  stash)
    mkdir -p $STASH || exit 1
    for d in "$@"; do cp "$d"/b.* $STASH/ || exit 1; done; ls -l $STASH ;;
  wheels)
    # the pieces so far may end inside a later member: tar's complaint about that is expected, gw/ comes first
    mkdir -p $STASH/x && (cat $STASH/b.* | tar -x -C $STASH/x gw 2>/dev/null || true)
    ls $STASH/x/gw/*.whl > /dev/null || { echo "no wheels in the pieces under $STASH"; exit 1; }
    python3 -m pip install -q --no-deps --target /root/wsite $STASH/x/gw/*.whl || exit 1
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if [ -f /root/wsite/bin/mosec ]; then cp /root/wsite/bin/mosec "$scripts"/ || exit 1; fi
    ls /root/wsite | tr '\n' ' '; echo ;;
  unpack)
    v=$1; mkdir -p $STASH/x /root/site
    cat $STASH/b.* | tar -x -C $STASH/x "v$v.tar.xz" || exit 1
    xz -T0 -dc $STASH/x/v$v.tar.xz | tar -x -C /root/site && ls /root/site ;;
  env)
    vllm_env "$1" ;;
  tests)
    v=$1 gpu=$2 out=$3; shift 3
    [ $# -eq 0 ] && set -- tests/test_vllm_sync.py tests/test_vllm_engine.py -k 'not ray'
    eval "$(vllm_env "$v")"
    echo "# pytest $*, vllm $v, GPU $gpu, $(date -u +%FT%TZ)" > "$out"
    CUDA_VISIBLE_DEVICES=$gpu setsid timeout -k 5 ${TESTS_TIMEOUT:-300} python3 -m pytest -q -rA -p no:cacheprovider \
      "$@" >> "$out" 2>&1 &
    pid=$!; wait $pid; rc=$?; kill -9 -- -$pid 2>/dev/null; echo "# exit $rc" >> "$out"; tail -3 "$out" ;;
  run)
    v=$1 gpus=$2 seconds=$3 log=$4; shift 4
    eval "$(vllm_env "$v")"
    CUDA_VISIBLE_DEVICES=$gpus setsid timeout -k 5 "$seconds" "$@" > "$log" 2>&1 &
    pid=$!; wait $pid; rc=$?; kill -9 -- -$pid 2>/dev/null; echo "# exit $rc" >> "$log"; tail -3 "$log" ;;
  *) echo "unknown step $cmd"; exit 2 ;;
esac
