"""Where a decode step's time goes: the embedded engine's step at a given shape, kernel by kernel (issue 15).

    python benchmarks/decode_profile.py --shape 7b --out decode_profile_7b.json

Builds the shape with random bf16 weights, runs the GRPO benchmark's rollout once (compile, CUDA graphs), then
profiles `--steps` decode steps run eagerly over the same buffers (the kernels a captured graph replays; the
per-layer glue compiled as in the benchmark) at the cache width of a mid-response token. Groups the CUDA time by
kernel and by role (matmul, attention, sampling, elementwise/other), beside the step's floor (weights and K/V
read once at the measured bandwidth, or its FLOPs at the measured matmul peak). Also times the replayed graph.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

import grpo_common as common
from generate_matrix import shape_config
from generate_shapes import _param_shapes
from winnow.types import SamplingParams


def role(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")):
        return "matmul"
    if any(k in lowered for k in ("attend", "merge")):  # winnow's decode attention kernel
        return "attention (kernel)"
    if any(k in lowered for k in ("softmax", "masked_fill")):
        return "attention (softmax/mask)"
    if any(k in lowered for k in ("cumsum", "scan", "sort", "topk", "amax", "searchsorted")):
        return "sampling"
    return "other (elementwise, norms, copies)"


@torch.inference_mode()
def time_graph(decoder, width: int) -> float:
    """Milliseconds per replay of the captured step at `width` (20 replays after 3)."""
    graph = decoder._graph(width)  # captured at its first use if the call did not reach this width
    decoder._point_at(width)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        decoder._point_at(width)
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cpu", action="store_true", help="smoke test: the tiny shape on CPU (no graphs)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from winnow.engines.hf import HFEngine, HFEngineConfig

    device = torch.device("cpu" if args.cpu else "cuda")
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    cfg = shape_config(args.shape, cpu=args.cpu)
    tokenizer = common.build_tokenizer(cfg.vocab_size, cfg.eos_token_id)
    prompts = [tokenizer(t)["input_ids"] for t in common.prompt_texts(workload, cfg.vocab_size, cfg.eos_token_id, 1)]
    torch.manual_seed(common.SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if args.cpu else torch.bfloat16)
    engine = HFEngine(model, tokenizer, HFEngineConfig(max_batch_size=workload.num_sequences,
                                                       compile_decode=not args.cpu, decode="static" if args.cpu else "auto"),
                      device=device, copy_model=False)
    params = SamplingParams(temperature=1.0, max_tokens=workload.new_tokens, n=workload.num_samples, ignore_eos=True,
                            seed=0)
    engine.generate(prompts, params)  # compile + capture
    decoder = engine.decoder
    widths = sorted(w for (_, w) in decoder._graphs) or [decoder.k_cache.shape[3]]
    width = widths[len(widths) // 2]
    ceilings = common.measure_ceilings(device)
    graph_ms = None if args.cpu else time_graph(decoder, width)

    decoder._point_at(width)
    decoder._step(width)
    common.sync(device)
    activity = torch.profiler.ProfilerActivity.CPU if args.cpu else torch.profiler.ProfilerActivity.CUDA
    kind = torch.autograd.DeviceType.CPU if args.cpu else torch.autograd.DeviceType.CUDA
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(args.steps):
            decoder._point_at(width)
            decoder._step(width)
        common.sync(device)
    by_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == kind and (not args.cpu or event.name.startswith("aten::")):
            seconds = event.self_cpu_time_total if args.cpu else event.device_time
            by_kernel[event.name] += seconds / 1000 / args.steps  # ms per step
            counts[event.name] += 1
    by_role: dict[str, float] = defaultdict(float)
    for name, ms in by_kernel.items():
        by_role[role(name)] += ms
    num_params = sum(int(torch.Size(s).numel()) for s in _param_shapes(cfg))
    layers, heads, kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    rows = workload.num_sequences
    step_bytes = 2 * num_params + rows * width * layers * 2 * kv_heads * head_dim * 2
    step_flops = 2 * num_params * rows + 4 * layers * heads * head_dim * width * rows
    floor_ms = 1000 * max(step_bytes / (ceilings["bandwidth_gbps"] * 1e9), step_flops / (ceilings["matmul_tflops"] * 1e12))
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:25]
    result = {**common.environment(device), "shape": args.shape, "rows": rows, "width": width,
              "graph_step_ms": graph_ms, "eager_kernel_ms": sum(by_kernel.values()), "floor_step_ms": floor_ms,
              "floor_bound": "memory" if step_bytes / ceilings["bandwidth_gbps"] / 1e9 > step_flops / ceilings["matmul_tflops"] / 1e12 else "compute",
              "kernels_per_step": sum(counts.values()) / args.steps, "by_role_ms": dict(by_role),
              "top_kernels_ms": [{"name": n[:160], "ms": ms, "calls_per_step": counts[n] / args.steps} for n, ms in top],
              "ceilings": ceilings}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("shape", "width", "graph_step_ms", "eager_kernel_ms", "floor_step_ms",
                                             "kernels_per_step", "by_role_ms")}, indent=1))
    for item in result["top_kernels_ms"]:
        print(f"{item['ms']:8.3f} ms  x{item['calls_per_step']:5.0f}  {item['name']}")


if __name__ == "__main__":
    main()
