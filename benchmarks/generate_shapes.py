"""Generation alone at larger shapes (issue 13): the GRPO benchmark's rollout on a random Qwen2.5-1.5B or -7B
shape, through winnow's Engine.generate, with either engine.

    python benchmarks/generate_shapes.py --shape 1.5b --engine vllm --out gen_vllm_1.5b.json
    python benchmarks/generate_shapes.py --shape 7b --engine winnow --out gen_winnow_7b.json
    python benchmarks/generate_shapes.py --shape 7b --engine vllm --tp 2 --sync --out gen_vllm_7b_tp2.json

The workload is the benchmark's generate phase (`grpo_common.GPU_WORKLOAD`): 64 prompts x 8 samples, 128-token
prompts, exactly 512 new tokens, temperature 1, sampled-token logprobs. One warm-up call (compilation, CUDA
graphs), then the median of `--repeats` timed calls. vLLM runs on dummy weights (`load_format="dummy"`: random,
nothing read from disk), bf16, its engine core in its own process; winnow's engine on a bf16 random init with
its CUDA-graph decode and compiled decode glue, as in the benchmark. The floor is `grpo_common.floors`' generate
floor at this shape (weights and KV cache read once per decode step at the measured bandwidth).

`--tp N` shards vLLM's model over GPUs 0..N-1 (tensor parallel). `--sync` then also measures the weight sync of
a learner's model at this shape (bf16, on GPU 0, a different random init): three syncs through
`sync_weights` (256 MiB buckets, CUDA IPC handles that every vLLM worker opens and loads its shard from; the
median is reported against the floor of reading and writing the bytes once), then the engine-vs-learner logprob
gap on a probe (16 prompts x 128 sampled tokens), which shows the engine runs the learner's weights.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import grpo_common as common
from winnow.data.tiny import save_tokenizer
from winnow.types import SamplingParams

SHAPES = {  # the Qwen2.5 configs' shapes (transformers Qwen2Config fields)
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def qwen_config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       hidden_act="silu", use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
                       architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--engine", choices=["vllm", "winnow"], required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vllm-memory", type=float, default=0.4)
    parser.add_argument("--tp", type=int, default=1, help="vLLM's tensor_parallel_size")
    parser.add_argument("--sync", action="store_true", help="vLLM: also time the weight sync and check the gap")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    workload = common.GPU_WORKLOAD
    cfg = qwen_config(args.shape)
    tokenizer = common.build_tokenizer(cfg.vocab_size, cfg.eos_token_id)
    prompts = [tokenizer(text)["input_ids"] for text in
               common.prompt_texts(workload, cfg.vocab_size, cfg.eos_token_id, 1 + args.repeats)]
    ceilings = common.measure_ceilings(device)
    start = time.perf_counter()
    if args.engine == "vllm":
        from winnow.engines.vllm import VLLMEngine, VLLMEngineConfig

        path = Path(tempfile.mkdtemp()) / args.shape
        cfg.save_pretrained(path)
        save_tokenizer(tokenizer, path)  # a tokenizer class every transformers version loads
        engine = VLLMEngine(path, tokenizer, VLLMEngineConfig(
            dtype="bfloat16", load_format="dummy", gpu_memory_utilization=args.vllm_memory, seed=0,
            max_model_len=workload.prompt_len + workload.new_tokens, max_num_seqs=workload.num_sequences,
            multiprocessing=True, tensor_parallel_size=args.tp))
        version = engine.version
    else:
        from transformers import AutoModelForCausalLM

        from winnow.engines.hf import HFEngine, HFEngineConfig

        torch.manual_seed(common.SEED)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        engine = HFEngine(model, tokenizer, HFEngineConfig(max_batch_size=workload.num_sequences, compile_decode=True),
                          device=device, copy_model=False)
        version = None
    start_s = time.perf_counter() - start
    num_params = sum(int(torch.Size(s).numel()) for s in _param_shapes(cfg))
    params = SamplingParams(temperature=workload.temperature, max_tokens=workload.new_tokens, n=workload.num_samples,
                            ignore_eos=True, seed=0)
    times = []
    for i in range(1 + args.repeats):
        batch = prompts[i * workload.num_prompts : (i + 1) * workload.num_prompts]
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine.generate(batch, params)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        assert sum(c.num_tokens for c in out) == workload.generated_tokens
        print(f"{args.engine} {args.shape} call {i} ({'warm-up' if i == 0 else 'timed'}): {seconds:.2f}s", flush=True)
        if i:
            times.append(seconds)
        else:
            warmup_s = seconds
    floor = common.floors(cfg, num_params, workload, ceilings)["generate_s"]
    result = {**common.environment(device), "engine": args.engine, "shape": args.shape, "vllm": version,
              "num_params": num_params, "workload": common.workload_dict(workload), "ceilings": ceilings,
              "start_s": start_s, "warmup_s": warmup_s, "generate_s": times, "generate_median_s": common.median(times),
              "generated_tokens_per_s": workload.generated_tokens / common.median(times), "floor_generate_s": floor}
    result["tensor_parallel_size"] = args.tp if args.engine == "vllm" else 1
    result["gpu_memory_used_gib"] = [round((lambda free, total: (total - free) / 2**30)(*torch.cuda.mem_get_info(i)), 2)
                                     for i in range(torch.cuda.device_count())]
    if args.sync and args.engine == "vllm":
        result["sync"] = measure_sync(engine, cfg, prompts[: 16], workload, ceilings)
        print("SYNC " + json.dumps(result["sync"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps({k: result[k] for k in ("engine", "shape", "start_s", "generate_median_s",
                                                          "generated_tokens_per_s", "floor_generate_s")}), flush=True)
    if args.engine == "vllm":
        engine.close()


def measure_sync(engine, cfg, prompts: list[list[int]], workload, ceilings: dict) -> dict:
    """Three syncs of a bf16 learner model (a different random init, on GPU 0) into the engine, then the
    engine-vs-learner logprob gap on a probe."""
    from transformers import AutoModelForCausalLM

    from winnow.learner.batch import make_train_batch
    from winnow.learner.logprobs import sequence_logprobs
    from winnow.learner.sync import iter_buckets

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(common.SEED + 1)
    with torch.device(device):
        learner = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    times = []
    for _ in range(3):
        common.sync(device)
        t = time.perf_counter()
        buckets = list(iter_buckets(learner.named_parameters(), 256 * 2**20))
        for i, bucket in enumerate(buckets):
            engine.update_weights(bucket, is_last_bucket=i == len(buckets) - 1)
        times.append(time.perf_counter() - t)
    nbytes = sum(p.numel() * p.element_size() for p in learner.parameters())
    params = SamplingParams(temperature=workload.temperature, max_tokens=128, n=1, ignore_eos=True, seed=4321)
    completions = engine.generate(prompts, params)
    batch = make_train_batch(completions, torch.zeros(len(completions))).to(device)
    with torch.no_grad():
        recomputed = sequence_logprobs(learner, batch, temperature=workload.temperature)
    diff = (recomputed - batch.engine_logprobs).abs()[batch.response_mask.bool()].float()
    return {**engine.last_sync, "seconds": times, "median_s": common.median(times), "bytes": nbytes,
            "floor_s": 2 * nbytes / (ceilings["bandwidth_gbps"] * 1e9),  # read once, written once, one GPU
            "logprob_gap": {"tokens": diff.numel(), "mean": float(diff.mean()), "p99": float(diff.quantile(0.99)),
                            "max": float(diff.max())}}


def _param_shapes(cfg):
    """Parameter shapes from the config, on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [p.shape for p in model.parameters()]


if __name__ == "__main__":
    main()
