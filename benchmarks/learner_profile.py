"""Where the learner's time goes (issue 15's MFU targets): one GRPO optimizer step over the benchmark's batch
(512 rows x 640 tokens: 128 prompt + 512 response), timed for a few learner variants and profiled kernel by
kernel, at the Qwen2.5-0.5B or -1.5B shape on one GPU.

    PYTHONPATH=$PWD python benchmarks/learner_profile.py --shape 0.5b --out learner_0.5b.json
    PYTHONPATH=$PWD python benchmarks/learner_profile.py --cpu --out /tmp/learner_cpu.json   # a dry run

Each variant builds a fresh random-init policy (float32 master weights, bf16 autocast), trains one warm-up step
(the compile, when on) and then `--steps` timed ones. MFU is 6·N·(trained tokens) over the measured bf16 matmul
peak, the benchmark's definition. The profiled step's CUDA kernels are summed by kind (matmul, attention,
compiled elementwise, the head's log-softmax, optimizer, copies, other), so the table says how far the matmuls
alone would take MFU (`mfu_if_only_matmuls`) and how much is idle time between kernels.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import grpo_common as common  # noqa: E402
from winnow.algorithms import GRPO  # noqa: E402
from winnow.learner.batch import make_train_batch  # noqa: E402
from winnow.learner.learner import Learner, LearnerConfig  # noqa: E402
from winnow.types import Completion  # noqa: E402

VARIANTS = {  # name: LearnerConfig fields
    "mb32_compiled": dict(micro_batch_size=32, compile=True),
    "mb64_compiled": dict(micro_batch_size=64, compile=True),
    "mb16_compiled": dict(micro_batch_size=16, compile=True),
    "mb32_eager": dict(micro_batch_size=32, compile=False),
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


def make_batch(workload, vocab_size: int):
    generator = torch.Generator().manual_seed(0)
    completions = []
    for i in range(workload.num_sequences):
        prompt = torch.randint(3, vocab_size, (workload.prompt_len,), generator=generator).tolist()
        response = torch.randint(3, vocab_size, (workload.new_tokens,), generator=generator).tolist()
        completions.append(Completion(prompt_ids=prompt, response_ids=response, logprobs=[-1.0] * len(response),
                                      finish_reason="length", text=""))
    batch = make_train_batch(completions, torch.zeros(len(completions)), pad_token_id=0)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["0.5b", "1.5b", "7b"], default="0.5b")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU: checks the script, times nothing")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    ceilings = common.measure_ceilings(device)
    peak = ceilings["matmul_tflops"] * 1e12
    result = {**common.environment(device), "shape": "tiny" if args.cpu else args.shape,
              "workload": common.workload_dict(workload), "ceilings": ceilings, "variants": {}}
    loss_fn = lambda lp, mb, **kw: GRPO().loss(lp, mb, max_tokens=workload.new_tokens, **kw)  # noqa: E731
    batch = None
    for name in args.variants:
        policy = build_policy(args, device)
        num_params = sum(p.numel() for p in policy.parameters())
        if batch is None:
            batch = make_batch(workload, policy.config.vocab_size)
        fields = VARIANTS[name] if not args.cpu else {**VARIANTS[name], "compile": False}
        learner = Learner(policy, LearnerConfig(lr=1e-6, **fields), total_steps=100, device=device)
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        try:
            start = time.perf_counter()
            learner.train_policy(batch, loss_fn)
            common.sync(device)
            first_s = time.perf_counter() - start
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                learner.train_policy(batch, loss_fn)
                common.sync(device)
                times.append(time.perf_counter() - start)
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch.profiler.profile(activities=activities) as prof:
                start = time.perf_counter()
                learner.train_policy(batch, loss_fn)
                common.sync(device)
                profiled_s = time.perf_counter() - start
        except torch.OutOfMemoryError as error:
            result["variants"][name] = {"oom": str(error)[:200]}
            print(f"{name}: out of memory", flush=True)
            continue
        step_s = common.median(times)
        flops = 6 * num_params * workload.trained_tokens
        row = {"fields": fields, "first_step_s": first_s, "step_s": step_s, "steps_s": times,
               "mfu": flops / step_s / peak, "tokens_per_s": workload.trained_tokens / step_s,
               "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                   else None),
               "profiled_step_s": profiled_s, **kernel_breakdown(prof, profiled_s)}
        matmul_s = row["kernel_seconds"]["matmul"]
        row["mfu_if_only_matmuls"] = flops / matmul_s / peak if matmul_s > 0 else None
        result["variants"][name] = row
        print(f"{name}: step {step_s:.3f} s, MFU {row['mfu']:.3f}, kernels "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["kernel_seconds"].items()) + f", idle {row['idle_s']:.3f}",
              flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        del learner, policy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["num_params"] = num_params
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
