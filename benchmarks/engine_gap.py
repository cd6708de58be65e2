"""The engine's logprob gap to the learner, for the static decoder as it is and as another revision's file has it,
in one process on one policy (a change to the decoder's numerics shows here, not only in speed).

    PYTHONPATH=$PWD python benchmarks/engine_gap.py --other /tmp/old/static_decode.py --out gap.json   # GPU
    PYTHONPATH=$PWD python benchmarks/engine_gap.py --other winnow/engines/static_decode.py --cpu --out /tmp/g.json

One random-init policy at the Qwen2.5-0.5B shape (float32 master weights; the learner recomputes under bf16
autocast on a GPU, as in training) and one engine (its bf16 copy, compiled decode). For each seed the engine
samples every prompt once, 128 tokens at temperature 1 (EOS ignored), with its own decoder for every seed, then
with the other file's `StaticDecoder` on the same weights; the learner recomputes each sampled token's logprob.
The sampled tokens differ between the two once their numerics do, so the report gives each decoder's mean, p99
and max |engine - learner| over all seeds, and the per-seed means. `--no-rope-kernel` runs this decoder without
`kernels.rope_and_cache` (its compiled RoPE and cache writes instead).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import grpo_common as common  # noqa: E402
from winnow.engines.hf import HFEngine, HFEngineConfig  # noqa: E402
from winnow.learner.batch import make_train_batch  # noqa: E402
from winnow.learner.learner import Learner, LearnerConfig  # noqa: E402
from winnow.types import SamplingParams  # noqa: E402


def load_decoder_class(path: str):
    """`StaticDecoder` from a file of the module (another revision's), imported under its own name."""
    spec = importlib.util.spec_from_file_location("other_static_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StaticDecoder


def gaps(engine: HFEngine, learner: Learner, prompts: list[list[int]], seed: int, max_tokens: int) -> torch.Tensor:
    """|engine - learner| logprob of every token the engine samples for `prompts` with `seed`."""
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, n=1, seed=seed, ignore_eos=True)
    completions = engine.generate(prompts, params)
    batch = make_train_batch(completions, torch.zeros(len(completions))).to(learner.device)
    with torch.no_grad():
        recomputed = learner.logprobs(learner.model, batch)
    return (recomputed - batch.engine_logprobs).abs()[batch.response_mask.bool()].float().cpu()


def summary(values: list[torch.Tensor]) -> dict:
    every = torch.cat(values)
    means = [float(v.mean()) for v in values]
    return {"tokens": every.numel(), "mean": float(every.mean()), "p99": float(every.quantile(0.99)),
            "max": float(every.max()), "seed_means": means, "seed_mean_stdev": statistics.stdev(means)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="a static_decode.py of another revision")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--no-rope-kernel", action="store_true",
                        help="this decoder without `kernels.rope_and_cache` (its compiled RoPE and cache writes)")
    parser.add_argument("--cpu", action="store_true", help="the tiny model on CPU: checks the script")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error(f"--seeds {args.seeds}: at least 2 (the report gives the spread of the seeds' means)")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no GPU here: the comparison runs the bf16 engine on a GPU; --cpu checks the script on CPU")
    if not Path(args.other).is_file():
        parser.error(f"--other {args.other}: no such file (a static_decode.py of another revision)")
    device = torch.device("cpu" if args.cpu else "cuda")
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    model = common.build_model(args.cpu, device)
    cfg = model.config
    tokenizer = common.build_tokenizer(cfg.vocab_size, cfg.eos_token_id)
    prompts = [tokenizer(text)["input_ids"] for text in common.prompt_texts(workload, cfg.vocab_size,
                                                                            cfg.eos_token_id, 1)]
    engine = HFEngine(model, tokenizer, HFEngineConfig(compile_decode=not args.cpu,
                                                       decode="auto" if not args.cpu else "static"), device=device)
    learner = Learner(model, LearnerConfig(micro_batch_size=workload.num_prompts), total_steps=1, device=device)
    this = engine.decoder
    if args.no_rope_kernel:
        this._rope_cache = None
    other = load_decoder_class(args.other)(engine.model, use_graphs=this.use_graphs, bucket=this.bucket,
                                           compile=not args.cpu, min_rows=this.min_rows)
    max_tokens = min(128, workload.new_tokens)
    found = {"this": [], "other": []}
    for name, decoder in (("this", this), ("other", other)):  # one after the other: each its own graphs' memory
        engine.decoder = decoder
        for seed in range(args.seeds):
            found[name].append(gaps(engine, learner, prompts, 1000 + seed, max_tokens))
            print(f"{name} seed {seed}: mean {float(found[name][-1].mean()):.5f}", flush=True)
        decoder.release()
    report = {**common.environment(device), "other": args.other, "seeds": args.seeds, "max_tokens": max_tokens,
              "prompts": len(prompts), **{name: summary(values) for name, values in found.items()}}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name in ("this", "other"):
        s = report[name]
        print(f"{name}: mean {s['mean']:.5f} (seed means {min(s['seed_means']):.5f}-{max(s['seed_means']):.5f}), "
              f"p99 {s['p99']:.4f}, max {s['max']:.4f} over {s['tokens']} tokens")


if __name__ == "__main__":
    main()
