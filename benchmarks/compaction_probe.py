"""Decode with rows of different lengths on one GPU: finished-row compaction on vs off (issue 5, speed pass).

    python benchmarks/compaction_probe.py --out compaction.json

The GRPO benchmark's model and shapes (512 rows, 128-token prompts, up to 512 new tokens), but responses end
at any of `--num-stop-ids` token ids spread over the vocabulary, so with the random model each token stops
a row with probability ~num_stop_ids / vocab and lengths spread out with a long tail, as real responses'
do. The same seeded calls run with `min_active_rows=0` (compaction off) and the default (32), and the times
are compared in the same process. The responses are not compared: compaction draws the random numbers of
fewer rows, so sampled responses differ (the length distributions should not); that the two give the same
greedy responses is `tests/test_static_decode.py::test_graph_decode_compaction_on_gpu`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import grpo_common as common
from winnow.engines.hf import HFEngine, HFEngineConfig
from winnow.types import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="compaction.json")
    parser.add_argument("--num-stop-ids", type=int, default=1500)
    args = parser.parse_args()
    device = torch.device("cuda")
    workload = common.GPU_WORKLOAD
    model = common.build_model(False, device)
    vocab = model.config.vocab_size
    tokenizer = common.build_tokenizer(vocab, model.config.eos_token_id)
    texts = common.prompt_texts(workload, vocab, model.config.eos_token_id, 1)
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    stop_ids = list(range(7, vocab, vocab // args.num_stop_ids))[: args.num_stop_ids]
    params = SamplingParams(temperature=1.0, max_tokens=workload.new_tokens, n=workload.num_samples, seed=3,
                            ignore_eos=True, stop_token_ids=stop_ids)
    result = {**common.environment(device), "num_stop_ids": len(stop_ids), "runs": {}}
    for name, min_rows in (("compaction_off", 0), ("compaction_on", 32)):
        engine = HFEngine(model, tokenizer, HFEngineConfig(max_batch_size=512, min_active_rows=min_rows),
                          device=device)
        times = []
        for _ in range(3):  # the first call captures graphs
            torch.cuda.synchronize()
            start = time.perf_counter()
            completions = engine.generate(prompts, params)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        lengths = [len(c.response_ids) for c in completions]
        result["runs"][name] = {"seconds": times, "median_of_last_2_s": statistics.median(times[1:]),
                                "mean_length": statistics.mean(lengths), "max_length": max(lengths),
                                "tokens": sum(lengths), "final_active_rows": engine.decoder.active}
        print(name, result["runs"][name], flush=True)
        del engine
        torch.cuda.empty_cache()
    off, on = (result["runs"][k]["median_of_last_2_s"] for k in ("compaction_off", "compaction_on"))
    result["speedup"] = off / on
    print(f"compaction off {off:.2f}s, on {on:.2f}s: speed-up {off / on:.2f}x")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
