"""Time to first iteration: `winnow train grpo` from launch to the end of its first iteration, and what each part
costs (imports, loading and building, the first generate's compile and graph capture, the first train step's
compile), at the Qwen2.5-1.5B shape on one GPU.

    PYTHONPATH=$PWD python benchmarks/first_iteration.py --out benchmarks/results/first_iteration   # GPU, ~2 min
    PYTHONPATH=$PWD python benchmarks/first_iteration.py --cpu --out /tmp/first_iteration            # CPU dry run

The run is the real CLI on the GRPO benchmark's workload (`ray_scaling.py`'s local case: a random-init policy
saved as a checkpoint, 64 prompts x 8 samples, 128-token prompts, 512 new tokens, the parity reward, micro-batch
32, compiled decode glue and compiled learner layers), 2 iterations. The script watches the run's
metrics.jsonl and notes when the first row lands. Parts:

    imports          `import torch, transformers` and winnow's RL recipe in a fresh interpreter (measured apart)
    load and build   launch -> first row, less the imports and the first iteration's phases: config parsing,
                     checkpoint load, the engine's bf16 copy, the learner (optimizer), data and oracle
    first generate   its one-off part: iteration 1's generate - iteration 2's (torch.compile, CUDA graph capture)
    first train      its one-off part: iteration 1's train - iteration 2's (the compiled decoder layers)
    steady iteration iteration 2's phases

Writes OUT/first_iteration.json and OUT/first_iteration.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import grpo_common as common  # noqa: E402
from ray_scaling import ROOT, grpo_command, write_policy  # noqa: E402

PHASES = ("generate", "score", "advantages", "train", "sync")


def time_imports(env: dict) -> float:
    code = ("import time; t = time.perf_counter(); import torch, transformers; import winnow.recipes.rl; "
            "import winnow.engines.hf; print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU (a dry run)")
    parser.add_argument("--timeout", type=float, default=420)
    args = parser.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    policy, data = write_policy(out, args.cpu, workload, 2)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    imports_s = time_imports(env)
    command = grpo_command(policy, data, out, workload, 2, "first", args.cpu)
    if not args.cpu:
        command += ["--engine.compile-decode", "--learner.compile", "--learner.no-gradient-checkpointing"]
    metrics = out / "runs" / "first" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    log = open(out / "runs" / "first.log", "w")
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    first_row_s = None  # when iteration 1's row lands (the row of step 0 comes before the loop starts)
    while process.poll() is None and time.perf_counter() - start < args.timeout:
        if first_row_s is None and metrics.exists() and any(
                json.loads(line).get("step", 0) >= 1 for line in metrics.read_text().splitlines() if line.strip()):
            first_row_s = time.perf_counter() - start
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
    wall_s = time.perf_counter() - start
    if process.returncode != 0 or first_row_s is None:
        raise SystemExit(f"the run failed (exit {process.returncode}):\n" + (out / "runs" / "first.log").read_text()[-3000:])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    first, second = (next(r for r in rows if r.get("step") == step) for step in (1, 2))
    phases = lambda row: {p: row.get(f"time/{p}", 0.0) for p in PHASES}  # noqa: E731
    one = phases(first)
    result = {
        **common.environment(torch.device("cpu" if args.cpu else "cuda")),
        "shape": "tiny" if args.cpu else "1.5b", "workload": common.workload_dict(workload),
        "command": command[3:], "time_to_first_iteration_s": first_row_s, "wall_s": wall_s,
        "parts_s": {
            "imports": imports_s,
            "load_and_build": first_row_s - imports_s - sum(one.values()),
            "first_generate_one_off": one["generate"] - second["time/generate"],
            "first_train_one_off": one["train"] - second["time/train"],
            "steady_iteration": sum(phases(second).values()),
        },
        "first_iteration_phases_s": one, "second_iteration_phases_s": phases(second),
        "target_s": 30.0,
    }
    (out / "first_iteration.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Time to first iteration: `winnow train grpo`, {result['shape']} shape, {result['device']}", "",
             f"Launch to the end of iteration 1: **{first_row_s:.1f} s** (target 30 s).", "",
             "| part | seconds |", "|---|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in result["parts_s"].items()]
    (out / "first_iteration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
