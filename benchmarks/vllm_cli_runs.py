"""`winnow train grpo --engine-backend vllm --sync.check-sync` on one GPU (issue 13): the real CLI loop on a tiny and
on a Qwen2.5-0.5B-shaped model (random init, the arithmetic task's character tokenizer), not a timing benchmark.

    python benchmarks/vllm_cli_runs.py --out vllm_cli_runs.json [--work /tmp/vllm_cli]

The tiny run keeps vLLM's engine core in the CLI's process (the default: sync by reference); the 0.5B run puts it
in its own process (`--vllm-engine.multiprocessing`: sync by CUDA IPC handles) and sleeps it while the learner
trains. Both check the sync every iteration (the engine's logprobs of a fixed probe against the learner's, bf16
engine against the fp32 learner under bf16 autocast; a mean gap above 0.05 stops the run). Records per run: wall
seconds, the largest and mean sync gap, the sync's median seconds, median generate seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from winnow.data.tasks import make_task
from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer
from winnow.logging import read_metrics

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                  num_kv_heads=2)  # the Qwen2.5-0.5B shape (head_dim 64); the vocabulary is the task tokenizer's
COMMON = ["--engine-backend", "vllm", "--sync.check-sync", "--oracle.rewards", "exact", "--rollout.max-tokens", "8",
          "--rollout.prompts-per-iteration", "32", "--rollout.num-samples", "8", "--eval.every", "0", "--eval.k", "0",
          "--eval.max-prompts", "64", "--logging.no-progress", "--device", "cuda", "--no-save-final",
          "--vllm-engine.enforce-eager", "--vllm-engine.dtype", "bfloat16", "--vllm-engine.gpu-memory-utilization",
          "0.25"]
RUNS = {
    "tiny-in-process": (None, ["--num-iterations", "10"]),
    "0.5b-shape-own-process-sleep": (QWEN25_05B, ["--num-iterations", "10", "--vllm-engine.multiprocessing", "True",
                                                   "--vllm-engine.enable-sleep-mode"]),
}


def model_dir(work: Path, shape: dict | None) -> Path:
    task = make_task("arithmetic", seed=0)
    tokenizer = train_char_tokenizer([q + a for split in ("train", "eval") for q, a in task.examples(split)])
    model = build_tiny_model(tokenizer, seed=0, **(shape or {}))
    return save_tiny(model, tokenizer, work / ("init-" + ("0.5b" if shape else "tiny")))


def summary(run_dir: Path, seconds: float, returncode: int) -> dict:
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    pick = lambda key: [r[key] for r in rows if key in r]  # noqa: E731
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    return {"returncode": returncode, "seconds": seconds, "iterations": len(pick("time/generate")),
            "sync_logprob_diff_max": max(pick("sync/logprob_diff_max"), default=None),
            "sync_logprob_diff_mean_max": max(pick("sync/logprob_diff_mean"), default=None),
            "sync_seconds_median": med(pick("sync/seconds")), "generate_s_median": med(pick("time/generate")),
            "reward_first": (pick("reward/mean") or [None])[0], "reward_last": (pick("reward/mean") or [None])[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="vllm_cli_runs.json")
    parser.add_argument("--work", default="/tmp/vllm_cli")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run")
    args = parser.parse_args()
    work = Path(args.work)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
    for name, (shape, flags) in RUNS.items():
        path = model_dir(work, shape)
        start = time.perf_counter()
        # Its own process group: whatever vLLM starts goes with it when the run ends or times out.
        proc = subprocess.Popen([sys.executable, "-m", "winnow.cli", "train", "grpo", "--model.path", str(path),
                                 *COMMON, *flags, "--output-dir", str(work), "--run-name", name],
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            returncode = -9
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        result["runs"][name] = summary(work / name, time.perf_counter() - start, returncode)
        print("RESULT", name, json.dumps(result["runs"][name]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
