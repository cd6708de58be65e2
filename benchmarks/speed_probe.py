"""Speed-pass probe on one GPU (issue 5): checks and times the engine's decode paths and the learner's
options on the GRPO benchmark's model and shapes, one variant at a time, in one process.

    python benchmarks/speed_probe.py --out probe.json [--budget-s 420]

Engine: `decode="graph"` vs `decode="hf"` (greedy tokens and logprobs on a small batch; the learner's
logprobs of the graph path's samples), seeded replay, then the benchmark's generate (512 rows, 128 + 512
tokens, ignore_eos): capture time, first and second call. Learner: `Learner.train_policy` on 512 x 640
tokens for each (activation checkpointing, micro-batch, fused head, compiled layers) variant: seconds,
tokens/s, MFU (6·N·tokens over the measured matmul peak) and peak memory. Results go to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import grpo_common as common
from winnow.algorithms import GRPO
from winnow.engines.hf import HFEngine, HFEngineConfig
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.logprobs import sequence_logprobs
from winnow.types import Completion, SamplingParams

LEARNER_VARIANTS = [  # (name, gradient checkpointing, micro-batch, fused head, compile layers)
    ("ckpt_mb16_plain", True, 16, False, False),
    ("ckpt_mb16_fused", True, 16, True, False),
    ("nockpt_mb16_fused", False, 16, True, False),
    ("nockpt_mb32_fused", False, 32, True, False),
    ("nockpt_mb64_fused", False, 64, True, False),
    ("nockpt_mb32_fused_compiled", False, 32, True, True),
]


def engine_checks(model, tokenizer, prompts, device) -> dict:
    out = {}
    small = prompts[:8]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    hf = HFEngine(model, tokenizer, HFEngineConfig(decode="hf"), device=device)
    graph = HFEngine(model, tokenizer, HFEngineConfig(decode="graph", max_batch_size=512), device=device)
    a, b = hf.generate(small, greedy), graph.generate(small, greedy)
    same_prefix = [next((i for i, (x, y) in enumerate(zip(p.response_ids, q.response_ids)) if x != y), 32)
                   for p, q in zip(a, b)]
    diffs = [abs(x - y) for p, q in zip(a, b) for x, y in list(zip(p.logprobs, q.logprobs))[:4]]
    out["greedy_tokens_equal_until_mean"] = sum(same_prefix) / len(same_prefix)
    out["greedy_first4_logprob_absdiff_max"] = max(diffs)
    del hf
    params = SamplingParams(temperature=1.0, max_tokens=64, n=4, seed=7, ignore_eos=True)
    s1, s2 = graph.generate(small, params), graph.generate(small, params)
    out["seeded_replay_equal"] = [c.response_ids for c in s1] == [c.response_ids for c in s2]
    batch = make_train_batch(s1, torch.zeros(len(s1)), pad_token_id=tokenizer.pad_token_id).to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        learner = sequence_logprobs(model, batch)
    engine = torch.zeros_like(learner)
    for row, c in enumerate(s1):
        start = len(c.prompt_ids)
        engine[row, start : start + len(c.logprobs)] = torch.tensor(c.logprobs, device=device)
    diff = (learner - engine).abs()[batch.response_mask.bool()]
    out["engine_vs_learner_logprob_absdiff_mean"] = float(diff.mean())
    out["engine_vs_learner_logprob_absdiff_p99"] = float(diff.quantile(0.99))
    return out, graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="probe.json")
    parser.add_argument("--budget-s", type=float, default=420)
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda")
    workload = common.GPU_WORKLOAD
    result = {**common.environment(device), "ceilings": common.measure_ceilings(device)}
    peak = result["ceilings"]["matmul_tflops"] * 1e12
    model = common.build_model(False, device)
    num_params = sum(p.numel() for p in model.parameters())
    tokenizer = common.build_tokenizer(model.config.vocab_size, model.config.eos_token_id)
    texts = common.prompt_texts(workload, model.config.vocab_size, model.config.eos_token_id, 2)
    prompts = [tokenizer(t)["input_ids"] for t in texts]

    checks, engine = engine_checks(model, tokenizer, prompts, device)
    result["engine_checks"] = checks
    print("engine checks", checks, flush=True)
    params = SamplingParams(temperature=1.0, max_tokens=workload.new_tokens, n=workload.num_samples, seed=1,
                            ignore_eos=True)
    gen = {}
    for name, chunk in (("first", prompts[: workload.num_prompts]), ("second", prompts[workload.num_prompts :]),
                        ("third", prompts[: workload.num_prompts])):
        seconds, completions = common.timed(device, lambda: engine.generate(chunk, params))
        gen[name] = seconds
        print(f"generate {name}: {seconds:.2f}s, {workload.generated_tokens / seconds:,.0f} tok/s "
              f"(capture {engine.decoder.last_capture_seconds:.2f}s)", flush=True)
    gen["capture_s"] = engine.decoder.last_capture_seconds
    gen["tokens_per_s"] = workload.generated_tokens / min(gen["second"], gen["third"])
    gen["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["generate"] = gen
    Path(args.out).write_text(json.dumps(result, indent=2))

    batch = make_train_batch(completions, torch.randn(len(completions)), pad_token_id=tokenizer.pad_token_id)
    batch.advantages = torch.randn(batch.batch_size)
    del engine
    torch.cuda.empty_cache()
    result["learner"] = {}
    for name, ckpt, micro, fused, compiled in LEARNER_VARIANTS:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skip {name}: budget", flush=True)
            continue
        policy = common.build_model(False, device)
        if compiled:
            for layer in policy.model.layers:
                layer.compile()
        learner = Learner(policy, LearnerConfig(lr=1e-6, micro_batch_size=micro, gradient_checkpointing=ckpt,
                                                fused_logprobs=fused), total_steps=100, device=device)
        loss_fn = lambda lp, mb, **kw: GRPO().loss(lp, mb, max_tokens=workload.new_tokens, **kw)  # noqa: E731
        torch.cuda.reset_peak_memory_stats(device)
        try:
            first, _ = common.timed(device, lambda: learner.train_policy(batch, loss_fn))
            second, metrics = common.timed(device, lambda: learner.train_policy(batch, loss_fn))
        except torch.OutOfMemoryError as error:
            print(f"{name}: out of memory ({error})", flush=True)
            result["learner"][name] = {"oom": True}
            continue
        flops = 6 * num_params * workload.trained_tokens
        row = {"first_s": first, "s": second, "tokens_per_s": workload.trained_tokens / second,
               "mfu": flops / second / peak, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
               "loss": metrics["loss"]}
        result["learner"][name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
        del learner, policy
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
