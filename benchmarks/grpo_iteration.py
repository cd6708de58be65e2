"""One GRPO policy iteration with winnow's own pieces, timed per phase (issue 5, the winnow side).

    python benchmarks/grpo_iteration.py --out winnow.json          # GPU: the Qwen2.5-0.5B-shape workload
    python benchmarks/grpo_iteration.py --cpu --out winnow.json    # CPU: a tiny Qwen2, seconds (smoke test)
    python benchmarks/grpo_iteration.py --engine vllm --out vllm.json   # the same loop sampling with vLLM

`--engine vllm` (issue 13) swaps HFEngine for the vllm engine: vLLM loads the same random-init policy from a
folder this script writes, runs its engine core in its own process (vLLM's default: the sync passes CUDA IPC
handles, `winnow/engines/vllm_sync.py`), bf16, all 512 sequences in one batch (`max_num_seqs`), and sleeps
(level 1) while the learner trains. After the measured iterations it also records: the engine-vs-learner
logprob gap on a fresh probe, the sync with vLLM's layerwise reload against a direct copy, and sleep level 2.
`--vllm-tp 2` shards vLLM's model over GPUs 0 and 1 (tensor parallel; the learner stays on GPU 0): each of
vLLM's two workers opens the same CUDA IPC handle per bucket and loads its own shard of it.

It drives `winnow.loops.Loop.step` with the RL family (generate -> score -> advantages -> train -> sync, each
phase timed by the runtime's own PhaseTimer, which synchronises CUDA at the end of each phase) with:
HFEngine (bf16 copy of the policy, decode="auto": CUDA-graph static decode on GPU, all 512 sequences in one
decode batch), a FunctionOracle over a synthetic verifiable reward (`grpo_common.parity_reward_texts`), GRPO
group advantages, Learner.train_policy (fp32 master weights, bf16 autocast, AdamW, micro-batch 32, no
activation checkpointing, fused head logprobs, compiled decoder layers on GPU, one optimizer step over all
512 samples) and engine.update_weights.

The workload, the floors and the ceilings are in `grpo_common.py`; `run_gpu_benchmark.sh` runs this and
the TRL side in one go and `grpo_report.py` writes the comparison.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import grpo_common as common
from winnow.data.tiny import save_tokenizer
from winnow.algorithms import GRPO
from winnow.engines.hf import HFEngine, HFEngineConfig
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.oracles.functions import FunctionOracle
from winnow.loops import LocalActor, Loop, RLFamily
from winnow.learner.sync import SyncConfig, sync_weights
from winnow.types import Completion, Prompt, SamplingParams


class _ListLogger:
    def __init__(self):
        self.rows = []

    def log(self, row, step=None):
        self.rows.append(row)


def _prompt_stream(prompts: list[Prompt], per_iteration: int):
    while True:
        for start in range(0, len(prompts), per_iteration):
            yield prompts[start : start + per_iteration]


def time_logprobs_pass(learner: Learner, workload: common.Workload, vocab: int, device, repeats: int = 2) -> float:
    """What a separate old-logprobs pass would cost (it is skipped at one optimizer step per iteration):
    Learner.logprobs over a batch of the iteration's shape, no grad, micro-batch as in training."""
    g = torch.Generator().manual_seed(1)
    completions = [
        Completion(torch.randint(10, vocab - 1, (workload.prompt_len,), generator=g).tolist(),
                   torch.randint(10, vocab - 1, (workload.new_tokens,), generator=g).tolist(),
                   [-1.0] * workload.new_tokens, "length", "")
        for _ in range(workload.num_sequences)
    ]
    batch = make_train_batch(completions, torch.zeros(len(completions)), pad_token_id=0).to(device)
    times = []
    for _ in range(repeats):
        common.sync(device)
        start = time.perf_counter()
        learner.logprobs(learner.model, batch)
        common.sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def start_vllm(model, tokenizer, workload: common.Workload, args):
    """The vllm engine on the policy's random init (written to a folder for vLLM to load), sized for the workload.
    Returns the engine and its start-up seconds."""
    from winnow.engines.vllm import VLLMEngine, VLLMEngineConfig

    path = Path(tempfile.mkdtemp()) / "policy"
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)  # a tokenizer class every transformers version loads
    cpu = next(model.parameters()).device.type == "cpu"
    config = VLLMEngineConfig(
        dtype="float32" if cpu else "bfloat16", gpu_memory_utilization=args.vllm_memory, seed=0,
        max_model_len=workload.prompt_len + workload.new_tokens, max_num_seqs=workload.num_sequences,
        enable_sleep_mode=not cpu, sleep_level=1, multiprocessing=not args.vllm_in_process, enforce_eager=cpu,
        kv_cache_space_gib=1 if cpu else None, tensor_parallel_size=args.vllm_tp)
    start = time.perf_counter()
    engine = VLLMEngine(path, tokenizer, config)
    seconds = time.perf_counter() - start
    print(f"vllm {engine.version} started in {seconds:.1f}s (in process: {engine.is_in_process}); features "
          f"{engine.features}", flush=True)
    return engine, seconds


def logprob_gap(engine, learner: Learner, prompts: list[Prompt], workload: common.Workload) -> dict:
    """|engine - learner| logprob per sampled token on a fresh probe: every prompt once, up to 128 tokens at the
    workload's temperature (the learner recomputes under its own precision: fp32 weights, bf16 autocast on GPU)."""
    params = SamplingParams(temperature=workload.temperature, max_tokens=min(128, workload.new_tokens), n=1,
                            seed=4321, ignore_eos=True)
    completions = engine.generate([p.token_ids for p in prompts], params)
    batch = make_train_batch(completions, torch.zeros(len(completions))).to(learner.device)
    with torch.no_grad():
        recomputed = learner.logprobs(learner.model, batch)
    diff = (recomputed - batch.engine_logprobs).abs()[batch.response_mask.bool()].float()
    return {"tokens": diff.numel(), "mean": float(diff.mean()), "p99": float(diff.quantile(0.99)),
            "max": float(diff.max())}


def vllm_sync_variants(engine, learner: Learner, prompts: list[Prompt], workload: common.Workload, cpu: bool) -> dict:
    """The vllm engine's sync measured on its own, after the loop: three syncs each with vLLM's layerwise reload
    (the default) and with a direct copy (`direct_load`), the logprob gap after each kind, and sleep level 2
    (weights discarded, not offloaded) beside level 1 (what the loop used)."""
    out = {}
    for direct in (False,) if cpu else (False, True):  # the CPU build repacks its weights: no direct copy there
        engine.config.direct_load = direct
        times = []
        for _ in range(3):
            common.sync(learner.device)
            start = time.perf_counter()
            sync_weights(learner, engine, SyncConfig().bucket_mb)
            times.append(time.perf_counter() - start)
        out["direct" if direct else "layerwise"] = {
            **engine.last_sync, "seconds": times, "median_s": common.median(times),
            "logprob_gap": logprob_gap(engine, learner, prompts[:16], workload)}
    engine.config.direct_load = False
    if not cpu:
        for level in (1, 2):
            engine.config.sleep_level = level
            start = time.perf_counter()
            engine.sleep()
            slept = time.perf_counter() - start
            free_asleep = torch.cuda.mem_get_info()[0]
            start = time.perf_counter()
            engine.wake()
            woke = time.perf_counter() - start
            sync_weights(learner, engine, SyncConfig().bucket_mb)
            out[f"sleep_level_{level}"] = {"freed_gib": engine.last_sleep_freed_gib, "sleep_s": slept,
                                           "wake_s": woke, "free_gib_asleep": free_asleep / 2**30,
                                           "logprob_gap": logprob_gap(engine, learner, prompts[:16], workload)}
        engine.config.sleep_level = 1
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny model on CPU (seconds; a smoke test)")
    parser.add_argument("--out", default="winnow_grpo.json")
    parser.add_argument("--iterations", type=int, default=None, help="measured iterations (default: 3 GPU, 2 CPU)")
    parser.add_argument("--no-compile", action="store_true", help="neither compiled decode nor compiled learner")
    parser.add_argument("--share-prompts", action="store_true",
                        help="learner.share_prompts: each prompt's samples run it once in the learner")
    parser.add_argument("--micro-batch-tokens", type=int, default=0, help="learner.micro_batch_tokens (0: rows)")
    parser.add_argument("--no-forward-while-scoring", action="store_true",
                        help="learner.forward_while_scoring off: the learner's first forward waits for the scores")
    parser.add_argument("--engine", choices=["winnow", "vllm"], default="winnow",
                        help="winnow's own engine (HFEngine) or the vllm engine")
    parser.add_argument("--vllm-in-process", action="store_true",
                        help="vllm engine core in this process (sync by reference) instead of its own")
    parser.add_argument("--vllm-memory", type=float, default=0.3, help="vLLM's gpu_memory_utilization")
    parser.add_argument("--vllm-tp", type=int, default=1,
                        help="vLLM's tensor_parallel_size (its workers on GPUs 0..N-1, the learner on GPU 0)")
    return parser.parse_args()


def make_prompts(tokenizer, workload, cfg) -> list[Prompt]:
    """Every iteration's prompts, each exactly `workload.prompt_len` tokens."""
    total_iterations = workload.warmup_iterations + workload.measured_iterations
    prompts = []
    for i, text in enumerate(common.prompt_texts(workload, cfg.vocab_size, cfg.eos_token_id, total_iterations)):
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == workload.prompt_len, (len(ids), workload.prompt_len)
        prompts.append(Prompt(text=text, token_ids=ids, index=i))
    return prompts


def make_engine(args, model, tokenizer, workload, device: torch.device, result: dict):
    """The engine under test; vLLM's start time, version, features and config go into `result`."""
    if args.engine != "vllm":
        return HFEngine(model, tokenizer, HFEngineConfig(max_batch_size=workload.num_sequences,
                                                         compile_decode=workload.engine_compile), device=device)
    engine, result["engine_start_s"] = start_vllm(model, tokenizer, workload, args)
    result["versions"]["vllm"] = engine.version
    result["vllm"] = {"features": dataclasses.asdict(engine.features), "in_process": engine.is_in_process,
                      "config": dataclasses.asdict(engine.config)}
    if device.type == "cuda":
        result["vllm"]["gpu_memory_used_gib_after_start"] = [
            round((lambda free, total: (total - free) / 2**30)(*torch.cuda.mem_get_info(i)), 2)
            for i in range(torch.cuda.device_count())]
    return engine


def make_loop(model, engine, tokenizer, prompts, workload, device) -> tuple[Learner, Loop]:
    """The learner and winnow's loop over the RL family, as the benchmark's docstring describes."""
    oracle = FunctionOracle([("parity", common.parity_reward, 1.0)])
    learner_config = LearnerConfig(lr=workload.lr, max_grad_norm=workload.max_grad_norm,
                                   micro_batch_size=workload.micro_batch_size,
                                   gradient_checkpointing=workload.gradient_checkpointing,
                                   compile=workload.learner_compile, share_prompts=workload.share_prompts,
                                   micro_batch_tokens=workload.micro_batch_tokens,
                                   forward_while_scoring=workload.forward_while_scoring)
    # The family reads only these rollout fields; the sampling ignores EOS (fixed length: the same work everywhere).
    sampling = SamplingParams(temperature=workload.temperature, max_tokens=workload.new_tokens,
                              n=workload.num_samples, ignore_eos=True)
    rollout = SimpleNamespace(max_tokens=workload.new_tokens, stop=[], drop_uniform_groups=False,
                              sampling_params=lambda seed=None: dataclasses.replace(sampling, seed=seed))
    learner = Learner(model, learner_config, total_steps=1000, device=device)
    actor = LocalActor(engine)
    family = RLFamily(actor=actor, learner=learner, oracle=oracle, objective=GRPO(), rollout=rollout,
                      eval_config=None, prompts=_prompt_stream(prompts, workload.num_prompts), eval_prompts=[],
                      seed=0, pad_token_id=tokenizer.pad_token_id)
    return learner, Loop(family, learner=learner, actor=actor, num_iterations=10**6, eval_every=0,
                         sync=SyncConfig(), logger=_ListLogger(), run_dir=Path(tempfile.mkdtemp()))


def run_iterations(runtime: Loop, engine, workload, args, device: torch.device, result: dict) -> list[dict]:
    """The warm-up and measured iterations; the measured ones' phase seconds (vLLM's sleep and sync details
    go into `result`)."""
    rows = []
    for iteration in range(1, workload.warmup_iterations + workload.measured_iterations + 1):
        if iteration == workload.warmup_iterations + 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        common.sync(device)
        start = time.perf_counter()
        log = runtime.step(iteration)
        common.sync(device)
        wall = time.perf_counter() - start
        phases = {k.removeprefix("time/"): v for k, v in log.items() if k.startswith("time/") and k != "time/iteration"}
        phases["logprobs"] = 0.0  # not a separate pass at one optimizer step per iteration (see semantics)
        phases["end_to_end"] = wall
        phases["weight_sync_inner"] = engine.last_sync_seconds
        # The learner's seconds: with its first forward run while the host scores, from that forward's launch (in
        # the score phase, after the batch is built) to the step's end; a bound from above, since the host's
        # scoring runs beside it. Learner rates and floor ratios use these, never `train` alone.
        # Either engine: the learner and the family are winnow's with both.
        phases["learner"] = phases["train"] + (phases["score"] + phases["advantages"]
                                               if workload.forward_while_scoring else 0.0)
        assert log["rollout/generated_tokens"] == workload.generated_tokens, log["rollout/generated_tokens"]
        assert log["rollout/trained_samples"] == workload.num_sequences, log["rollout/trained_samples"]
        kind = "warm-up" if iteration <= workload.warmup_iterations else "measured"
        print(f"iteration {iteration} ({kind}): " + ", ".join(f"{k} {v:.3f}s" for k, v in phases.items())
              + f"; reward {log['reward/mean']:.3f}, loss {log.get('train/loss', float('nan')):.4f}", flush=True)
        if kind == "measured":
            rows.append(phases)
            if args.engine == "vllm":
                result.setdefault("sleep_freed_gib", []).append(engine.last_sleep_freed_gib)
                result.setdefault("sync_detail", []).append(dict(engine.last_sync))
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    cpu = device.type == "cpu"
    workload = common.CPU_WORKLOAD if cpu else common.GPU_WORKLOAD
    if args.iterations:
        workload.measured_iterations = args.iterations
    if args.no_compile:
        workload.engine_compile = workload.learner_compile = False
    workload.share_prompts, workload.micro_batch_tokens = args.share_prompts, args.micro_batch_tokens
    workload.forward_while_scoring = not args.no_forward_while_scoring
    if cpu:
        torch.set_num_threads(1)
    framework = "winnow" if args.engine == "winnow" else "winnow+vllm"
    result = {"framework": framework, **common.environment(device), "workload": common.workload_dict(workload)}
    t0 = time.perf_counter()
    result["ceilings"] = common.measure_ceilings(device)
    print("ceilings", result["ceilings"], f"({time.perf_counter() - t0:.1f}s)", flush=True)

    model = common.build_model(cpu, device)
    cfg = model.config
    num_params = sum(p.numel() for p in model.parameters())
    tokenizer = common.build_tokenizer(cfg.vocab_size, cfg.eos_token_id)
    prompts = make_prompts(tokenizer, workload, cfg)
    engine = make_engine(args, model, tokenizer, workload, device, result)
    learner, runtime = make_loop(model, engine, tokenizer, prompts, workload, device)
    rows = run_iterations(runtime, engine, workload, args, device, result)

    result["peak_memory_gib"] = None if cpu else torch.cuda.max_memory_allocated(device) / 2**30
    if not cpu:
        free, total = torch.cuda.mem_get_info(device)
        result["gpu_used_gib_device_wide"] = (total - free) / 2**30  # every process: the vLLM engine core too
    result["logprob_gap"] = logprob_gap(engine, learner, prompts[: workload.num_prompts], workload)
    print("logprob gap", result["logprob_gap"], flush=True)
    if args.engine == "vllm":
        result["vllm_sync"] = vllm_sync_variants(engine, learner, prompts[: workload.num_prompts], workload, cpu)
        print("vllm sync", json.dumps(result["vllm_sync"]), flush=True)
    result["num_params"] = num_params
    result.update(common.summarize(rows, workload, num_params, result["ceilings"]))
    result["weight_sync_s"] = result["phases_median_s"]["sync"]
    result["logprobs_pass_s"] = time_logprobs_pass(learner, workload, cfg.vocab_size, device)
    result["floors"] = common.floors(cfg, num_params, workload, result["ceilings"])
    result["x_floor"] = common.over_floor(result["phases_median_s"], result["floors"])
    result["semantics"] = semantics(args, engine, workload)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_summary(result, rows)
    if args.engine == "vllm":
        engine.close()


def semantics(args, engine, workload) -> dict:
    if args.engine == "vllm":
        c = engine.config
        return {
            "driver": "winnow.loops.Loop.step over RLFamily, as the winnow side; end_to_end = wall time of step()",
            "generate": f"VLLMEngine.generate (vLLM {engine.version}, engine core "
                        f"{'in this process' if engine.is_in_process else 'in its own process'}, bf16, CUDA graphs "
                        f"and torch.compile (vLLM's defaults), max_num_seqs {c.max_num_seqs}, prefix caching, sampled-"
                        "token logprobs after temperature (processed_logprobs), ignore_eos, temperature 1, no "
                        "top-k/p, vLLM's detokenizer off (winnow decodes the text)",
            "score": "as the winnow side", "advantages": "as the winnow side", "logprobs": "as the winnow side",
            "train": "as the winnow side, plus LLM.sleep(level=1) at its start (weights to host, KV cache dropped)",
            "sync": "LLM.wake_up() then engine.update_weights per 256 MiB bucket of the learner's fp32 weights: "
                    f"packed as bf16 into one buffer per bucket, passed by {engine.last_sync.get('transport')}, loaded "
                    "by vLLM's layerwise reload in the worker, prefix cache reset",
        }
    return {
        "driver": "winnow.loops.Loop.step over RLFamily; phases timed by its PhaseTimer "
                  "(torch.cuda.synchronize at each phase's end); end_to_end = wall time of step() with a sync",
        "generate": f"HFEngine.generate, decode={engine.config.decode!r} -> "
                    f"{'graph (CUDA graphs over winnow static decode step)' if engine.decoder is not None and engine.decoder.use_graphs else 'static/hf'}"
                    f", compile_decode {workload.engine_compile}: bf16 engine copy, preallocated KV cache, attention in 128-column buckets, all "
                    f"{workload.num_sequences} sequences in one decode batch, ignore_eos, temperature 1, no top-k/p; "
                    "includes graph capture when shapes are new (warm-up only) and detokenising every response",
        "score": "FunctionOracle over the parity reward (decoded text), grouping"
                 + (", after building the right-padded TrainBatch on the host and launching the learner's first "
                    "micro-batch forward (learner.forward_while_scoring), which the GPU runs meanwhile"
                    if workload.forward_while_scoring else ""),
        "advantages": "GRPO group advantages (std-scaled)" + ("" if workload.forward_while_scoring else
                                                              " + building the right-padded TrainBatch on the host"),
        "logprobs": "0: with one optimizer step per iteration pi_old = pi, winnow skips the old-logprobs pass "
                    "(as TRL does); logprobs_pass_s times what Learner.logprobs over the batch would cost",
        "train": f"Learner.train_policy: one AdamW step over all {workload.num_sequences} samples, micro-batch "
                 f"{workload.micro_batch_size} (token budget {workload.micro_batch_tokens or 'off'}), shared prompts "
                 f"{workload.share_prompts}, activation checkpointing {workload.gradient_checkpointing}, "
                 f"learner.compile {workload.learner_compile} (TRL: no compile), fused head logprobs, "
                 "micro-batches sorted by length, fp32 master "
                 "weights under bf16 autocast, loss = GRPO clipped surrogate (seq-mean-token-mean) with TIS against "
                 "the engine logprobs, grad-norm clip 1.0",
        "sync": "engine.update_weights(learner.named_weights()): in-process fp32 -> bf16 copy into the engine",
        "learner": "train" + (" + score + advantages: the learner's first forward runs in the score phase (see "
                              "score); the learner's rates (trained tok/s, MFU) and x_floor's train use this"
                              if workload.forward_while_scoring else ": the learner's rates use this"),
    }


def print_summary(result: dict, rows: list[dict]) -> None:
    med, fl = result["phases_median_s"], result["floors"]
    print(f"\nwinnow, one GRPO iteration ({result['device']}), median of {len(rows)}:")
    print(f"{'phase':<12} {'seconds':>9} {'floor':>9}")
    for phase in ("generate", "score", "advantages", "logprobs", "train", "learner", "sync", "end_to_end"):
        floor = fl.get(f"{phase}_s")
        print(f"{phase:<12} {med.get(phase, 0.0):>9.3f} {'' if floor is None else f'{floor:9.3f}'}")
    peak = result["peak_memory_gib"]
    print(f"generated tok/s {result.get('generated_tokens_per_s', 0):,.0f}; trained tok/s "
          f"{result.get('trained_tokens_per_s', 0):,.0f}; MFU {result.get('learner_mfu', 0):.1%}; "
          + ("" if peak is None else f"peak mem {peak:.1f} GiB; ")
          + f"logprobs pass {result['logprobs_pass_s']:.3f}s")


if __name__ == "__main__":
    main()
