"""GPU check of the embedded path: the bf16 engine with a static KV cache, the bf16-autocast learner, and
a baseline throughput at the Qwen2.5-0.5B shape. One script, one device call:

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

It checks (asserts) that engine and learner logprobs agree on GPU, and reports (does not assert) the
numbers the later speed work starts from. The full end-to-end run on GPU is `winnow quickstart --device cuda`.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from winnow.engines.hf import HFEngine, HFEngineConfig
from winnow.learner.batch import make_train_batch
from winnow.learner.learner import Learner, LearnerConfig
from winnow.learner.logprobs import sequence_logprobs
from winnow.algorithms import GRPO
from winnow.types import SamplingParams

QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096, eos_token_id=151643,
)


class _IdTokenizer:
    """Enough of a tokenizer for random-weight benchmarks: ids in, digits out."""

    pad_token_id, eos_token_id = 0, 151643

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def check_parity(model, device, num_prompts=16, prompt_len=64, new_tokens=64) -> dict:
    """Engine (bf16, static cache) vs learner (fp32 weights, bf16 autocast) logprobs of the same samples."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (prompt_len - i % 7,), generator=g).tolist() for i in range(num_prompts)]
    engine = HFEngine(model, _IdTokenizer(), HFEngineConfig(kv_cache="static"), device=device)
    out = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, n=2, seed=0, ignore_eos=True))
    batch = make_train_batch(out, torch.zeros(len(out)), pad_token_id=0).to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        learner = sequence_logprobs(model, batch)
    mask = batch.response_mask.bool()
    diff = (learner[mask] - batch.engine_logprobs[mask]).abs()
    # Importance ratios are what the mismatch costs: exp(diff) per token.
    return {"max_abs_logprob_diff": float(diff.max()), "mean_abs_logprob_diff": float(diff.mean()),
            "p99_abs_logprob_diff": float(diff.quantile(0.99)), "num_tokens": int(mask.sum())}


def time_generation(model, device, kv_cache, num_prompts=64, n=8, prompt_len=128, new_tokens=256) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (prompt_len,), generator=g).tolist() for _ in range(num_prompts)]
    engine = HFEngine(model, _IdTokenizer(), HFEngineConfig(kv_cache=kv_cache, max_batch_size=512), device=device)
    params = SamplingParams(max_tokens=new_tokens, n=n, seed=0, ignore_eos=True)
    engine.generate(prompts[:4], SamplingParams(max_tokens=8, n=2, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(c.num_tokens for c in out)
    return {"kv_cache": kv_cache, "sequences": len(out), "new_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def time_training(model, device, num_sequences=512, prompt_len=128, new_tokens=512, micro_batch_size=16) -> dict:
    g = torch.Generator().manual_seed(0)
    from winnow.types import Completion

    completions = [
        Completion(torch.randint(10, 1000, (prompt_len,), generator=g).tolist(),
                   torch.randint(10, 1000, (new_tokens,), generator=g).tolist(), [-1.0] * new_tokens, "length", "")
        for _ in range(num_sequences)
    ]
    batch = make_train_batch(completions, torch.randn(num_sequences, generator=g), pad_token_id=0)
    learner = Learner(model, LearnerConfig(lr=1e-6, micro_batch_size=micro_batch_size,
                                           gradient_checkpointing=True), 10, device=device)
    objective = GRPO()
    loss_fn = lambda lp, b, **kw: objective.loss(lp, b, max_tokens=new_tokens, **kw)  # noqa: E731
    learner.train_policy(batch.select(slice(0, micro_batch_size)), loss_fn)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    learner.train_policy(batch, loss_fn)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = num_sequences * (prompt_len + new_tokens)
    params = sum(p.numel() for p in model.parameters())
    sync_start = time.perf_counter()
    engine = HFEngine(learner.model, _IdTokenizer(), device=device)
    engine.update_weights(learner.named_weights())
    return {"sequences": num_sequences, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "model_tflops_per_s": 6 * params * tokens / seconds / 1e12, "parameters": params,
            "gradient_checkpointing": True, "micro_batch_size": micro_batch_size,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "weight_sync_s": engine.last_sync_seconds, "engine_build_and_sync_s": time.perf_counter() - sync_start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B), dtype=torch.float32).to(device)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "model": "random-init Qwen2.5-0.5B shape (config above), fp32 master weights, bf16 engine",
    }
    result["parity"] = check_parity(model, device)
    print("parity", result["parity"], flush=True)
    assert result["parity"]["p99_abs_logprob_diff"] < 0.1, "engine and learner disagree on GPU"
    result["generate"] = [time_generation(model, device, cache) for cache in ("static", "dynamic")]
    print("generate", result["generate"], flush=True)
    result["train"] = time_training(model, device)
    print("train", result["train"], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
