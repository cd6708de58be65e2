"""Where the learner's time goes (issue 15's MFU targets): one GRPO optimizer step over the benchmark's batch
(512 rows x 640 tokens: 128 prompt + 512 response), timed for a few learner variants and profiled kernel by
kernel, at the Qwen2.5-0.5B or -1.5B shape on one GPU.

    PYTHONPATH=$PWD python benchmarks/learner_profile.py --shape 0.5b --out learner_0.5b.json
    PYTHONPATH=$PWD python benchmarks/learner_profile.py --cpu --out /tmp/learner_cpu.json   # a dry run

Each variant builds a fresh random-init policy (float32 master weights, bf16 autocast), trains one warm-up step
(the compile, when on: `first_step_s`) and then `--steps` timed ones. `--lengths varied` gives the responses
long-tailed lengths, so the micro-batches have different widths (what decides how often a compile repeats:
`mb32_compiled` compiles with symbolic shapes, `mb32_compiled_static` for the first width, then again).
MFU is 6·N·(trained tokens) over the measured bf16 matmul peak, the benchmark's definition; the `_shared` variants
run each prompt once for its 8 samples, so they also record the tokens the GPU ran and its MFU over those
(`hardware_mfu`). The profiled
step's CUDA kernels are summed by kind (matmul, attention, compiled elementwise, the head's log-softmax,
optimizer, copies, other), so the table says how far the matmuls alone would take MFU (`mfu_if_only_matmuls`)
and how much is idle time between kernels.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import grpo_common as common  # noqa: E402
from winnow.algorithms import GRPO  # noqa: E402
from winnow.learner.batch import make_train_batch  # noqa: E402
from winnow.learner import shared_prompts  # noqa: E402
from winnow.learner.learner import Learner, LearnerConfig  # noqa: E402
from winnow.types import Completion  # noqa: E402

VARIANTS = {  # name: LearnerConfig fields
    "mb32_compiled": dict(micro_batch_size=32, compile=True),
    "mb64_compiled": dict(micro_batch_size=64, compile=True),
    "mb16_compiled": dict(micro_batch_size=16, compile=True),
    "mb32_eager": dict(micro_batch_size=32, compile=False),
    "mb32_compiled_static": dict(micro_batch_size=32, compile=True, compile_dynamic=False),
    # micro-batches by tokens: 20,480 = 32 rows of the workload's 640, 40,960 = 64
    "tok20k_compiled": dict(micro_batch_tokens=20480, compile=True),
    "tok40k_compiled": dict(micro_batch_tokens=40960, compile=True),
    # micro-batches by tokens, the budget from 70% of the free memory (`--learner.micro-batch-memory 0.7`)
    "mem70_compiled": dict(micro_batch_memory=0.7, compile=True),
    # each prompt's 8 samples run it once (packed rows, the variable-length attention kernel)
    "mb32_compiled_shared": dict(micro_batch_size=32, compile=True, share_prompts=True),
    "tok40k_compiled_shared": dict(micro_batch_tokens=40960, compile=True, share_prompts=True),
    "tok80k_compiled_shared": dict(micro_batch_tokens=81920, compile=True, share_prompts=True),
    # the same with K/V repeated for the query heads (what a torch without the kernel's grouped-query entry runs)
    "tok40k_compiled_shared_repeat": dict(micro_batch_tokens=40960, compile=True, share_prompts=True,
                                          repeat_kv=True),
}
KINDS = [  # (kind, kernel-name pattern), first match wins
    ("attention", r"flash|fmha|attention|attn"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|sm90_|sm100_|wgmma|splitk"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("log_softmax_head", r"logsumexp|softmax|log_softmax|gather|scatter"),
    ("compiled_elementwise", r"^triton_"),
    ("copy", r"memcpy|memset|copy_|to_copy|CatArrayBatched|cat_"),
]


def shape_config(shape: str):
    from generate_shapes import qwen_config

    return common.model_config(cpu=False) if shape == "0.5b" else qwen_config(shape)


def build_policy(args, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(common.SEED)
    cfg = common.model_config(cpu=True) if args.cpu else shape_config(args.shape)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device)


def make_batch(workload, vocab_size: int, varied: bool = False):
    """The benchmark's batch, `num_samples` responses to each prompt (a GRPO rollout): every response `new_tokens`
    long, or (`varied`) long-tailed lengths (exponential, mean new_tokens / 4, cut at new_tokens), so micro-batches
    have different widths."""
    generator = torch.Generator().manual_seed(0)
    completions = []
    for i in range(workload.num_sequences):
        if i % workload.num_samples == 0:
            prompt = torch.randint(3, vocab_size, (workload.prompt_len,), generator=generator).tolist()
        length = workload.new_tokens
        if varied:
            draw = -torch.log(torch.rand(1, generator=generator)).item() * workload.new_tokens / 4
            length = max(1, min(workload.new_tokens, int(draw)))
        response = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        completions.append(Completion(prompt_ids=prompt, response_ids=response, logprobs=[-1.0] * len(response),
                                      finish_reason="length", text=""))
    group_index = torch.arange(workload.num_sequences) // workload.num_samples
    batch = make_train_batch(completions, torch.zeros(len(completions)), pad_token_id=0, group_index=group_index)
    batch.advantages = torch.randn(batch.batch_size, generator=generator)
    return batch


def kernel_breakdown(prof, step_s: float) -> dict:
    seconds = {kind: 0.0 for kind, _ in KINDS} | {"other": 0.0}
    top = []
    for event in prof.key_averages():
        # Kernels only: an operator's row (aten::mm) also carries its kernels' time as its own device time.
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0:
            continue
        name = event.key
        kind = next((k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")
        seconds[kind] += device_us / 1e6
        top.append((device_us / 1e6, name[:90], kind))
    busy = sum(seconds.values())
    top.sort(reverse=True)
    return {"kernel_seconds": seconds, "busy_s": busy, "idle_s": max(step_s - busy, 0.0),
            "top_kernels": [{"s": s, "name": n, "kind": k} for s, n, k in top[:25]]}


def compile_parts() -> dict[str, float]:
    """torch.compile's own timers so far, seconds per part (tracing, AOT autograd, code generation, waiting for
    the kernels' compile workers, the backward graph's compile at its first backward)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {key: sum(values) for key, values in compilation_time_metrics.items()}


def measure_variant(name: str, policy, batch, workload, device: torch.device, peak: float, steps: int) -> dict:
    """One warm-up step, `steps` timed ones and (on a GPU) one profiled one of the variant's learner."""
    fields = VARIANTS[name] if device.type == "cuda" else {**VARIANTS[name], "compile": False}
    shared_prompts.GQA_KERNEL = not fields.get("repeat_kv", False)
    config = LearnerConfig(lr=1e-6, **{k: v for k, v in fields.items() if k != "repeat_kv"})
    learner = Learner(policy, config, total_steps=100, device=device)
    loss_fn = lambda lp, mb, **kw: GRPO().loss(lp, mb, max_tokens=workload.new_tokens, **kw)  # noqa: E731
    step = lambda: learner.train_policy(batch, loss_fn)  # noqa: E731
    torch._dynamo.reset()  # each variant compiles from scratch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_before = compile_parts()
    first_s, _ = common.timed(device, step)
    compile_after = compile_parts()
    times = [common.timed(device, step)[0] for _ in range(steps)]
    step_s = common.median(times)
    tokens = int(batch.attention_mask.sum())
    flops = 6 * sum(p.numel() for p in policy.parameters()) * tokens
    run_tokens = tokens - shared_tokens(learner, batch) if fields.get("share_prompts") else tokens
    row = {"fields": fields, "first_step_s": first_s, "step_s": step_s, "steps_s": times, "trained_tokens": tokens,
           "mfu": flops / step_s / peak, "tokens_per_s": tokens / step_s,
           # with shared prompts the GPU runs fewer tokens than it trains on: the utilisation of what it ran
           "run_tokens": run_tokens, "hardware_mfu": flops * run_tokens / tokens / step_s / peak,
           "micro_batches": len(learner._micro_batch_rows(batch)), "token_budget": learner.last_token_budget,
           "first_step_compile_s": {key: seconds - compile_before.get(key, 0.0) for key, seconds in
                                    compile_after.items() if seconds - compile_before.get(key, 0.0) >= 0.05}}
    if device.type == "cuda":  # kernels exist only there
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            profiled_s, _ = common.timed(device, step)
        row.update(peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30, profiled_step_s=profiled_s,
                   **kernel_breakdown(prof, profiled_s))
        matmul_s = row["kernel_seconds"]["matmul"]
        row["mfu_if_only_matmuls"] = flops / matmul_s / peak if matmul_s > 0 else None
    return row


def shared_tokens(learner, batch) -> int:
    """Prompt tokens the learner's shared-prompt micro-batches do not run again."""
    from winnow.learner.shared_prompts import shared_layout

    return sum(shared_layout(batch.select(rows)).num_shared_tokens for rows in learner._micro_batch_rows(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["0.5b", "1.5b", "7b"], default="0.5b")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU, uncompiled: checks the script")
    parser.add_argument("--lengths", choices=["fixed", "varied"], default="fixed",
                        help="responses all new_tokens long, or long-tailed (micro-batches of different widths)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    ceilings = common.measure_ceilings(device)
    result = {**common.environment(device), "shape": "tiny" if args.cpu else args.shape,
              "workload": common.workload_dict(workload), "lengths": args.lengths, "ceilings": ceilings,
              "variants": {}}
    batch = None
    for name in args.variants:
        policy = build_policy(args, device)
        result["num_params"] = sum(p.numel() for p in policy.parameters())
        if batch is None:  # one batch for every variant
            batch = make_batch(workload, policy.config.vocab_size, varied=args.lengths == "varied")
        try:
            row = measure_variant(name, policy, batch, workload, device, ceilings["matmul_tflops"] * 1e12, args.steps)
        except torch.OutOfMemoryError as error:
            row = {"oom": str(error)[:200]}
        result["variants"][name] = row
        print(f"{name}: " + ("out of memory" if "oom" in row else f"step {row['step_s']:.3f} s, MFU {row['mfu']:.3f}")
              + ("" if "oom" in row else f", first step {row['first_step_s']:.1f} s")
              + "".join(f", {k} {v:.3f} s" for k, v in row.get("kernel_seconds", {}).items()), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        del policy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if all("oom" in row for row in result["variants"].values()):
        raise SystemExit(f"every variant ran out of memory: nothing measured ({args.out} says which)")


if __name__ == "__main__":
    main()
