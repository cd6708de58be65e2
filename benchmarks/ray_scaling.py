"""GRPO with `--runtime local` on one GPU against `--runtime ray` on two (issue 12), through the real CLI.

    PYTHONPATH=$PWD python benchmarks/ray_scaling.py --out benchmarks/results/ray_scaling     # 2 GPUs, ~8 min
    PYTHONPATH=$PWD python benchmarks/ray_scaling.py --cpu --out /tmp/ray_scaling            # CPU dry run, tiny
    PYTHONPATH=$PWD python benchmarks/ray_scaling.py --shape 7b --cases b --micro-batch-size 4 \
        --extra=--sync.check-sync --out benchmarks/results/ray_scaling_7b                      # 7B on 2 GPUs

Cases (each one `winnow train grpo` process, the same seed, data and reward):
    a          --runtime local, 1 GPU (learner and embedded engine in one process)
    b          --runtime ray, colocated on 2 GPUs: 2 workers, each an engine replica + an FSDP2 learner rank
    b_ds       the same with DeepSpeed ZeRO-3 as the learner (skipped when deepspeed does not import)
    c          --runtime ray, split: 1 engine GPU + 1 learner GPU (single-device learner, NCCL broadcast)
    w2, w4     weak scaling: --runtime ray, colocated on 2 / 4 GPUs (FSDP2 learner ranks), the workload per GPU
               kept (128 / 256 prompts x 8 samples an iteration), so their ideal is 2x / 4x a's samples/s

Workload: a random-init Qwen2.5-1.5B-shaped policy (`generate_shapes.SHAPES["1.5b"]`; `--shape 7b`: the 7B
shape, whose 114 GiB of float32 weights, gradients and AdamW state need at least two GPUs), 64 prompts x 8 samples
per iteration, 128-token prompts, up to 512 new tokens (a random model almost never samples EOS), one optimizer
step per iteration, micro-batch 32, the parity reward of `grpo_common`. `--iterations` measured iterations
after `--warmup` (CUDA graph capture, first allocations). Per case: samples/s (samples / median iteration
seconds), median seconds per phase from the run's metrics.jsonl, sync seconds, and peak memory per GPU
(nvidia-smi, device-wide, polled every 0.5 s). The goal: b at least 1.8x a's samples/s.

Writes OUT/ray_scaling.json and OUT/ray_scaling.md; each case's run directory and log stay under OUT/runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import grpo_common as common  # noqa: E402

CASES = ["a", "b", "b_ds", "c", "w2", "w4"]
GPUS = {"a": 1, "b": 2, "b_ds": 2, "c": 2, "w2": 2, "w4": 4}
WEAK = {"w2": 2, "w4": 4}  # prompts per iteration x this
PHASES = ("generate", "score", "advantages", "train", "sync", "iteration")
REWARD = f"{HERE / 'ray_scaling_reward.py'}:parity"


def case_flags(case: str, gpu: bool) -> list[str] | None:
    """The CLI flags of one case, or None when it cannot run here."""
    if case == "a":
        return ["--runtime", "local"]
    gpus = ["--ray.gpus-per-worker", "1"] if gpu else []
    if case == "b":
        return ["--runtime", "ray", "--ray.placement", "colocated", "--ray.num-learner-ranks", "2",
                "--learner.strategy", "fsdp2", *gpus]
    if case == "b_ds":
        try:
            import deepspeed  # noqa: F401
        except Exception:
            return None
        return ["--runtime", "ray", "--ray.placement", "colocated", "--ray.num-learner-ranks", "2",
                "--learner.strategy", "deepspeed", "--learner.sharding.zero-stage", "3", *gpus]
    if case in WEAK:
        return ["--runtime", "ray", "--ray.placement", "colocated", "--ray.num-learner-ranks", str(WEAK[case]),
                "--learner.strategy", "fsdp2", *gpus]
    if case == "c":
        return ["--runtime", "ray", "--ray.placement", "split", "--ray.num-replicas", "1",
                "--ray.num-learner-ranks", "1", *gpus]
    raise ValueError(f"unknown case {case!r}")


def write_policy(out: Path, cpu: bool, workload: common.Workload, num_iterations: int, shape: str = "1.5b"
                 ) -> tuple[Path, Path]:
    """The random-init policy and its word-level tokenizer (a folder every worker loads), and the prompts; kept
    from an earlier call into the same OUT. The 7B shape is initialised on the GPU and saved in bf16 (float32 on
    the host would take minutes and 30 GB); the learner still trains in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from generate_shapes import qwen_config
    from winnow.data.tiny import save_tokenizer

    config = common.model_config(True) if cpu else qwen_config(shape)
    policy, data = out / "policy", out / "prompts.jsonl"
    if (policy / "config.json").exists() and data.exists():  # an earlier call's (cases run in two calls)
        return policy, data
    torch.manual_seed(common.SEED)
    big = shape == "7b" and not cpu
    with torch.device("cuda" if big else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if big else torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(policy)
    tokenizer = common.build_tokenizer(config.vocab_size, config.eos_token_id)
    # in a folder of its own: next to a qwen2 config.json, AutoTokenizer would load it as Qwen2Tokenizer,
    # which splits the words differently
    save_tokenizer(tokenizer, out / "tokenizer")
    iterations = (num_iterations + 1) * max(WEAK.values())  # enough for the largest weak-scaling case
    texts = common.prompt_texts(workload, config.vocab_size, config.eos_token_id, iterations)
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return policy, data


class GpuMemory:
    """Peak memory used per GPU (device-wide, every process), polled with nvidia-smi while a case runs."""

    def __init__(self, enabled: bool):
        self.enabled, self.peak_mib, self._stop = enabled and shutil.which("nvidia-smi") is not None, {}, None

    def __enter__(self):
        if self.enabled:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.strip().splitlines():
                index, used = (int(x) for x in line.split(","))
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()


def grpo_command(policy: Path, data: Path, out: Path, workload, iterations: int, run_name: str, cpu: bool) -> list[str]:
    """`winnow train grpo` on the benchmark's workload (the policy and prompts `write_policy` wrote)."""
    return [sys.executable, "-m", "winnow.cli", "train", "grpo", "--model.path", str(policy),
            "--model.tokenizer", str(policy.parent / "tokenizer"),
            "--data.train", str(data), "--data.answer-column", "None", "--data.eval-fraction", "0",
            "--oracle.rule.rewards", REWARD, "--rollout.prompts-per-iteration", str(workload.num_prompts),
            "--rollout.num-samples", str(workload.num_samples), "--rollout.max-tokens", str(workload.new_tokens),
            "--data.max-prompt-tokens", str(workload.prompt_len),
            "--learner.micro-batch-size", str(workload.micro_batch_size), "--learner.lr", "1e-6",
            "--engine.max-batch-size", str(workload.num_sequences), "--num-iterations", str(iterations),
            "--eval.every", "0", "--eval.max-prompts", "0", "--rollout.max-idle-iterations", str(iterations + 1),
            "--output-dir", str(out / "runs"), "--run-name", run_name, "--overwrite", "--no-save-final",
            "--logging.no-progress", *(["--device", "cpu", "--num-threads", "1"] if cpu else [])]


def run_case(case: str, flags: list[str], policy: Path, data: Path, out: Path, args, workload) -> dict:
    iterations = args.warmup + args.iterations
    workload = dataclasses.replace(workload, num_prompts=workload.num_prompts * WEAK.get(case, 1))
    command = [*grpo_command(policy, data, out, workload, iterations, case, args.cpu), *flags]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    print(f"--- case {case}: {' '.join(flags)}", flush=True)
    start = time.perf_counter()
    with GpuMemory(not args.cpu) as memory, open(out / "runs" / f"{case}.log", "w") as log:
        process = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.case_timeout)
    wall = time.perf_counter() - start
    result = {"case": case, "flags": flags, "returncode": process.returncode, "wall_s": wall,
              "peak_memory_gib_per_gpu": {str(k): v / 1024 for k, v in sorted(memory.peak_mib.items())} or None}
    metrics_file = out / "runs" / case / "metrics.jsonl"
    if process.returncode != 0 or not metrics_file.exists():
        result["error"] = (out / "runs" / f"{case}.log").read_text()[-2000:]
        print(f"case {case} failed (exit {process.returncode}); see {out / 'runs' / f'{case}.log'}", flush=True)
        return result
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    measured = [r for r in rows if r["step"] > args.warmup]
    result["phases_median_s"] = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in measured) for p in PHASES}
    result["sync_s"] = statistics.median(r.get("sync/seconds", float("nan")) for r in measured)
    result["sync_bytes"] = measured[-1].get("sync/bytes")
    result["samples_per_iteration"] = workload.num_sequences
    result["samples_per_s"] = workload.num_sequences / result["phases_median_s"]["iteration"]
    result["generated_tokens_per_s"] = statistics.median(r["throughput/generated_tokens_per_s"] for r in measured)
    if "sync/logprob_diff_mean" in measured[-1]:  # --sync.check-sync: every replica against the learner
        result["check_sync"] = {k: max(r[k] for r in rows if k in r)
                                for k in ("sync/logprob_diff_mean", "sync/logprob_diff_max")}
    print(f"case {case}: {result['samples_per_s']:.1f} samples/s; phases {result['phases_median_s']}", flush=True)
    return result


def markdown(result: dict) -> str:
    lines = [f"# Ray scaling: GRPO, {result['shape']} shape, {result['device']}", "",
             f"{result['workload']['num_prompts']} prompts x {result['workload']['num_samples']} samples, "
             f"{result['workload']['prompt_len']}-token prompts, up to {result['workload']['new_tokens']} new tokens; "
             f"median of {result['iterations']} iterations after {result['warmup']} warm-up. "
             "Ideal: a's samples/s x the GPUs a case uses (perfect scaling, the ceiling).", "",
             "| case | GPUs | samples/s | vs a | ideal | generate s | train s | sync s | iteration s | peak GiB per GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = next((c.get("samples_per_s") for c in result["cases"] if c["case"] == "a"), None)
    for c in result["cases"]:
        if "samples_per_s" not in c:
            lines.append(f"| {c['case']} | | failed or skipped: {c.get('skipped', 'see its log')} | | | | | | | |")
            continue
        gpus = GPUS[c["case"]]
        ratio = f"{c['samples_per_s'] / base:.2f}x" if base else ""
        floor = f"{base * gpus:.1f}" if base else ""
        p = c["phases_median_s"]
        peak = ", ".join(f"{v:.1f}" for v in (c["peak_memory_gib_per_gpu"] or {}).values()) or "n/a"
        lines.append(f"| {c['case']} | {gpus} | {c['samples_per_s']:.1f} | {ratio} | {floor} | {p['generate']:.2f} | "
                     f"{p['train']:.2f} | {c['sync_s']:.3f} | {p['iteration']:.2f} | {peak} |")
    for c in result["cases"]:
        if "check_sync" in c:
            lines.append(f"\n{c['case']}: `--sync.check-sync` on every replica after every sync: logprobs off the "
                         f"learner's by {c['check_sync']['sync/logprob_diff_mean']:.2e} per token on average at worst "
                         f"(max {c['check_sync']['sync/logprob_diff_max']:.2e}).")
    if result.get("extra_flags"):
        lines.append(f"\nEvery case also ran with `{result['extra_flags']}`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for ray_scaling.json, ray_scaling.md and the runs")
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU, Ray with gloo (a dry run)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated cases to run (a, b, b_ds, c, w2, w4); "
                        "a later call into the same --out adds its cases to the table")
    parser.add_argument("--shape", choices=["1.5b", "7b"], default="1.5b", help="the policy's shape (GPU only)")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="learner rows per micro-batch "
                        "(0: the workload's 32; the 7B shape needs ~4 beside a colocated engine)")
    parser.add_argument("--extra", default="", help="more CLI flags for every case, e.g. --extra=--sync.check-sync")
    parser.add_argument("--iterations", type=int, default=2, help="measured iterations per case")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up iterations per case (not measured)")
    parser.add_argument("--case-timeout", type=float, default=300, help="seconds before a case is stopped")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    if args.micro_batch_size:
        workload = dataclasses.replace(workload, micro_batch_size=args.micro_batch_size)
    policy, data = write_policy(out, args.cpu, workload, args.warmup + args.iterations, args.shape)
    result = {"shape": "tiny" if args.cpu else f"Qwen2.5-{args.shape.upper()}",
              "device": "cpu" if args.cpu else _gpu_names(), "extra_flags": args.extra,
              "workload": common.workload_dict(workload), "iterations": args.iterations, "warmup": args.warmup,
              "cases": _earlier_cases(out / "ray_scaling.json", args.cases.split(","))}
    for case in args.cases.split(","):
        flags = case_flags(case, gpu=not args.cpu)
        flags = None if flags is None else [*flags, *shlex.split(args.extra)]
        measured = ({"case": case, "skipped": "deepspeed does not import"} if flags is None else
                    run_case(case, flags, policy, data, out, args, workload))
        result["cases"] = sorted(result["cases"] + [measured], key=lambda c: CASES.index(c["case"]))
        (out / "ray_scaling.json").write_text(json.dumps(result, indent=2))
    (out / "ray_scaling.md").write_text(markdown(result))
    print(markdown(result))
    failed = [c["case"] for c in result["cases"] if "error" in c and c["case"] in args.cases.split(",")]
    if failed:  # the table says so too; the exit status must
        raise SystemExit(f"case(s) {', '.join(failed)} failed: see their logs under {out / 'runs'}")


def _earlier_cases(path: Path, cases: list[str]) -> list[dict]:
    """Cases an earlier call measured into the same OUT (and not measured again now), so that the cases can run
    in two calls and still land in one table."""
    if not path.exists():
        return []
    return [c for c in json.loads(path.read_text())["cases"] if c["case"] not in cases]


def _gpu_names() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = out.stdout.strip().splitlines()
    return f"{len(names)} x {names[0]}" if names else "unknown GPU"


if __name__ == "__main__":
    main()
