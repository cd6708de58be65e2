"""Sync into a vLLM whose engine core runs in another process (vLLM's default), checked against the hf engine.

Run by test_vllm_engine.py in its own process: vLLM tears down process-wide state (its distributed groups) when a
second engine in the same process shuts down, which would break the test module's in-process engine.

    python tests/vllm_cross_process_sync.py OUT_DIR   # prints a line RESULT {json}: transport, buckets, the checks
"""
from __future__ import annotations

import json
import os
import sys

import torch

from winnow.data.tiny import build_tiny_model, save_tiny, train_char_tokenizer
from winnow.engines.hf import HFEngine
from winnow.engines.vllm import VLLMEngine, VLLMEngineConfig
from winnow.learner.sync import iter_buckets
from winnow.types import SamplingParams


def main(out_dir: str) -> None:
    tokenizer = train_char_tokenizer(["0123456789+-*= "])
    a, b = build_tiny_model(tokenizer, seed=0), build_tiny_model(tokenizer, seed=1)
    path = save_tiny(a, tokenizer, os.path.join(out_dir, "tiny-a"))
    engine = VLLMEngine(path, tokenizer, VLLMEngineConfig(dtype="float32", max_model_len=64, seed=0, enforce_eager=True,
                                                          multiprocessing=True, gpu_memory_utilization=0.2))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("12+34=", "7+8=")]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = HFEngine(b, tokenizer, device="cpu").generate(prompts, greedy)
    before = engine.generate(prompts, greedy)
    # The learner's tensors where the learner would hold them: a GPU when there is one (CUDA IPC), else the CPU
    # (shared memory). Buckets small enough that layers span two of them.
    learner = b.to("cuda" if torch.cuda.is_available() else "cpu")
    buckets = list(iter_buckets(learner.named_parameters(), 20_000))
    for i, bucket in enumerate(buckets):
        engine.update_weights(bucket, is_last_bucket=i == len(buckets) - 1)
    after = engine.generate(prompts, greedy)
    gap = max(abs(x - y) for c, e in zip(after, expected) for x, y in zip(c.logprobs, e.logprobs))
    print("RESULT " + json.dumps({
        "is_in_process": engine.is_in_process, **engine.last_sync,
        "changed": [c.logprobs for c in before] != [c.logprobs for c in after],  # greedy ids may coincide
        "equals_hf": [c.response_ids for c in after] == [c.response_ids for c in expected],
        "max_logprob_gap": gap,
    }), flush=True)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1])
