"""The real loop on one GPU (not a timing benchmark): the quickstart (SFT warm start + GRPO) with the default
GPU engine (CUDA-graph decode), then PPO and LoRA-GRPO from its SFT model, each through the CLI, with the
sync check on. Records held-out greedy accuracy before/after, wall time and the engine-vs-learner sync
difference per run into --out (JSON) and prints a table.

    python benchmarks/gpu_e2e.py --out gpu_e2e.json [--work /tmp/gpu_e2e]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from winnow.logging import read_metrics

RUNS = {  # name: extra CLI flags after `winnow train ALGO --model.path SFT`
    "ppo": ["ppo", "--rollout.prompts-per-iteration", "64", "--rollout.num-samples", "1", "--learner.lr", "3e-5",
            "--algo.critic-lr", "3e-4", "--num-iterations", "60"],
    "lora-grpo": ["grpo", "--rollout.prompts-per-iteration", "32", "--rollout.num-samples", "8", "--learner.lr",
                  "1e-3", "--lora-rank", "8", "--lora-alpha", "16", "--num-iterations", "30", "--seed", "1"],
}
COMMON = ["--oracle.rewards", "exact", "--rollout.max-tokens", "8", "--learner.micro-batch-size", "256",
          "--eval.every", "0", "--eval.k", "0", "--eval.max-prompts", "200", "--logging.no-progress",
          "--device", "cuda", "--sync.check-sync"]


def summary(run_dir: Path, seconds: float) -> dict:
    rows = read_metrics(run_dir)
    evals = [r["eval/greedy_accuracy"] for r in rows if "eval/greedy_accuracy" in r]
    diffs = [r["sync/logprob_diff_max"] for r in rows if "sync/logprob_diff_max" in r]
    gen = [r["time/generate"] for r in rows if "time/generate" in r]
    return {"accuracy_before": evals[0], "accuracy_after": evals[-1], "seconds": seconds,
            "sync_logprob_diff_max": max(diffs) if diffs else None,
            "generate_s_median": sorted(gen)[len(gen) // 2] if gen else None, "iterations": len(gen)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_e2e.json")
    parser.add_argument("--work", default="/tmp/gpu_e2e")
    args = parser.parse_args()
    work = Path(args.work)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "winnow.cli", "quickstart", "--device", "cuda", "--output-dir",
                    str(work / "quickstart")], check=True)
    result["runs"]["quickstart-grpo"] = summary(work / "quickstart" / "grpo", time.perf_counter() - start)
    print(result["runs"]["quickstart-grpo"], flush=True)
    sft = work / "quickstart" / "sft" / "final"
    for name, flags in RUNS.items():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "winnow.cli", "train", *flags[:1], "--model.path", str(sft), *flags[1:],
                        *COMMON, "--output-dir", str(work), "--run-name", name], check=True)
        result["runs"][name] = summary(work / name, time.perf_counter() - start)
        print(name, result["runs"][name], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| run | accuracy before | after | seconds | max sync logprob diff |\n|---|---:|---:|---:|---:|")
    for name, r in result["runs"].items():
        diff = "-" if r["sync_logprob_diff_max"] is None else f"{r['sync_logprob_diff_max']:.2e}"
        print(f"| {name} | {r['accuracy_before']:.3f} | {r['accuracy_after']:.3f} | {r['seconds']:.0f} | {diff} |")


if __name__ == "__main__":
    main()
