"""Generation alone, every size and two length profiles, one engine per process (issue 15, item 1; issue 13's
seeding question).

    python benchmarks/generate_matrix.py --engine winnow --shapes 0.5b,1.5b,7b --out gen_matrix_winnow.json
    python benchmarks/generate_matrix.py --engine vllm --shapes 7b --seeding per-prompt,none --out gen_matrix_vllm_7b.json
    python benchmarks/generate_matrix.py --cpu --engine winnow --out /tmp/gen_matrix_cpu.json   # smoke test
    python benchmarks/generate_matrix.py --engine winnow --shapes 1.5b --max-batch-size 256 --out chunked.json
    python benchmarks/generate_matrix.py --engine winnow --max-batch-size 128 --refill both --out refill.json

Workloads, on the GRPO benchmark's rollout (64 prompts x 8 samples, 128-token prompts, temperature 1, sampled-
token logprobs; random weights):
- `fixed`: exactly 512 new tokens per response (EOS ignored), the benchmark's generate phase;
- `longtail`: up to 512 new tokens, ending at any of a fixed set of stop ids covering 0.6% of the vocabulary,
  so a response ends with probability ~0.006 per token: lengths spread like real RL responses (median ~100,
  a few percent run to the limit). What finished rows cost (compaction, continuous batching) shows here.

`--max-batch-size` below the rollout's 512 rows makes winnow decode that many at a time; `--refill on` gives the
slots of finished rows to waiting requests (the engine's default), `off` runs equal chunks one after the other,
`both` measures the two on the same engine in one process. Each winnow row records the decode steps and the rows x
steps the decoder ran (the work), and how many refills it made.

Seeding (vLLM only): `per-prompt` is what winnow sends by default (one seed per prompt, so a prompt's samples do
not depend on the rest of the call or on how prompts are split across replicas); `none` sends no seed, so vLLM
draws from its global generator (`VLLMEngineConfig(seeding="global")`).

Every row records the floor for the lengths that were actually generated (weights read once per decode step
while any row runs, each running row's K/V cache read up to its length, at the measured bandwidth; or the FLOPs
at the measured matmul peak, whichever is larger) and the ratio to it; and the same with each prompt's K/V read
once a step for its samples (`floor_shared`: what an engine whose samples of one prompt read one copy of it can
reach, as winnow's decoder and vLLM's prefix caching do).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import grpo_common as common
from generate_shapes import SHAPES, _param_shapes
from winnow.data.tiny import save_tokenizer
from winnow.types import SamplingParams

STOP_FRACTION = 0.006
"""the share of the vocabulary that ends a `longtail` response"""


def shape_config(shape: str, cpu: bool):
    from transformers import Qwen2Config

    if cpu:
        return common.model_config(cpu=True)
    if shape == "0.5b":
        return Qwen2Config.from_json_file(str(common.CONFIG_PATH))
    from generate_shapes import qwen_config

    return qwen_config(shape)


def stop_ids(vocab_size: int, eos_id: int) -> list[int]:
    """A fixed, spread-out set of ids (never a prompt's low ids) that end a `longtail` response."""
    count = max(1, round(vocab_size * STOP_FRACTION))
    step = (vocab_size - 20) // count
    return sorted({20 + i * step for i in range(count)} | {eos_id})


def floor_for_lengths(cfg, num_params: int, prompt_len: int, lengths: list[int], ceilings: dict,
                      num_samples: int = 1) -> float:
    """Seconds at the measured ceilings for these response lengths (prefill included; see the module doc).
    `num_samples` > 1: lengths[i*n:(i+1)*n] are one prompt's samples, and its K/V are read once a step while any of
    them runs (the floor of an engine whose samples of a prompt read one copy of it)."""
    peak, bandwidth = ceilings["matmul_tflops"] * 1e12, ceilings["bandwidth_gbps"] * 1e9
    layers, heads, kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_bytes = layers * 2 * kv_heads * head_dim * 2
    batch = len(lengths)
    prefill_flops = 2 * num_params * batch * prompt_len + 2 * layers * heads * head_dim * prompt_len**2 * batch
    seconds = max(prefill_flops / peak, (2 * num_params + batch * prompt_len * kv_bytes) / bandwidth)
    ordered = sorted(lengths)
    longest = sorted(max(lengths[i:i + num_samples]) for i in range(0, batch, num_samples))  # per prompt
    for step in range(1, max(lengths)):  # decode step `step` feeds token `step` of every row still running
        running = batch - _count_at_most(ordered, step)
        prompts = len(longest) - _count_at_most(longest, step)  # prompts with a sample still running
        context = prompt_len + step
        step_bytes = 2 * num_params + (prompts * prompt_len + running * (step + 1)) * kv_bytes
        step_flops = 2 * num_params * running + 4 * layers * heads * head_dim * context * running
        seconds += max(step_bytes / bandwidth, step_flops / peak)
    return seconds


def _count_at_most(ordered: list[int], value: int) -> int:
    import bisect

    return bisect.bisect_right(ordered, value)


def build_engine(engine_name: str, cfg, tokenizer, workload, device, vllm_memory: float,
                 max_batch_size: int | None):
    if engine_name == "vllm":
        from winnow.engines.vllm import VLLMEngine, VLLMEngineConfig

        path = Path(tempfile.mkdtemp()) / "model"
        cfg.save_pretrained(path)
        save_tokenizer(tokenizer, path)
        return VLLMEngine(path, tokenizer, VLLMEngineConfig(
            dtype="bfloat16", load_format="dummy", gpu_memory_utilization=vllm_memory, seed=0,
            max_model_len=workload.prompt_len + workload.new_tokens, max_num_seqs=workload.num_sequences,
            multiprocessing=True))
    from transformers import AutoModelForCausalLM

    from winnow.engines.hf import HFEngine, HFEngineConfig

    torch.manual_seed(common.SEED)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    batch = workload.num_sequences if max_batch_size is None else max_batch_size
    cuda = device.type == "cuda"  # on CPU the decoder's step runs eagerly, the path the GPU captures
    return HFEngine(model, tokenizer, HFEngineConfig(max_batch_size=batch, compile_decode=cuda,
                                                     decode="auto" if cuda else "static"),
                    device=device, copy_model=False)


def timed_calls(engine, prompts, params, per_call: int, num_calls: int, device, label: str):
    """Generate for `num_calls` batches of `per_call` prompts; the first is a warm-up. Returns the other calls'
    seconds, response lengths and (winnow) the decoder's work: steps, rows x steps, refills."""
    decoder = getattr(engine, "decoder", None)
    times, lengths, work = [], [], []
    for i in range(num_calls):
        batch = prompts[i * per_call: (i + 1) * per_call]
        before = (decoder.decode_steps, decoder.row_steps, decoder.refills) if decoder else (0, 0, 0)
        common.sync(device)
        t = time.perf_counter()
        out = engine.generate(batch, params)
        common.sync(device)
        seconds = time.perf_counter() - t
        print(f"{label} call {i}{' (warm-up)' if i == 0 else ''}: {seconds:.2f}s", flush=True)
        if i:
            times.append(seconds)
            lengths.append([c.num_tokens for c in out])
            if decoder:
                now = (decoder.decode_steps, decoder.row_steps, decoder.refills)
                work.append({key: a - b for key, a, b in zip(("decode_steps", "row_steps", "refills"), now, before)})
    return times, lengths, work


def run_shape(args, shape: str, device, ceilings: dict, save) -> None:
    """Every workload (and seeding) on one shape; `save` gets each row as soon as it is measured."""
    workload = common.CPU_WORKLOAD if args.cpu else common.GPU_WORKLOAD
    cfg = shape_config(shape, args.cpu)
    tokenizer = common.build_tokenizer(cfg.vocab_size, cfg.eos_token_id)
    num_calls = 1 + args.repeats
    prompts = [tokenizer(text)["input_ids"] for text in
               common.prompt_texts(workload, cfg.vocab_size, cfg.eos_token_id, num_calls)]
    start = time.perf_counter()
    engine = build_engine(args.engine, cfg, tokenizer, workload, device, args.vllm_memory, args.max_batch_size)
    start_s = time.perf_counter() - start
    num_params = sum(int(torch.Size(s).numel()) for s in _param_shapes(cfg))
    seedings = args.seeding.split(",") if args.engine == "vllm" else ["per-prompt"]
    refills = [None] if args.engine == "vllm" else {"on": [True], "off": [False], "both": [True, False]}[args.refill]
    for workload_name, seeding, refill in ((w, s, r) for w in args.workloads.split(",") for s in seedings
                                           for r in refills):
        base = SamplingParams(temperature=workload.temperature, max_tokens=workload.new_tokens, n=workload.num_samples,
                              ignore_eos=True)
        if workload_name == "longtail":
            base = replace(base, ignore_eos=False, stop_token_ids=stop_ids(cfg.vocab_size, cfg.eos_token_id))
        if refill is not None:
            engine.config.refill = refill
        params = replace(base, seed=0 if seeding == "per-prompt" else None)
        label = f"{args.engine} {shape} {workload_name} {seeding} refill {refill}"
        times, lengths, work = timed_calls(engine, prompts, params, workload.num_prompts, num_calls, device, label)
        floors = [floor_for_lengths(cfg, num_params, workload.prompt_len, call, ceilings) for call in lengths]
        shared = [floor_for_lengths(cfg, num_params, workload.prompt_len, call, ceilings, workload.num_samples)
                  for call in lengths]
        flat = sorted(n for call in lengths for n in call)
        row = {"engine": args.engine, "shape": shape, "workload": workload_name, "seeding": seeding,
               "max_batch_size": args.max_batch_size, "refill": refill, "decoder_work": work,
               "start_s": start_s, "generate_s": times, "generate_median_s": statistics.median(times),
               "tokens": [sum(call) for call in lengths],
               "tokens_per_s": statistics.median(sum(c) / s for c, s in zip(lengths, times)),
               "length_median": flat[len(flat) // 2], "length_p90": flat[int(0.9 * (len(flat) - 1))],
               "at_limit_fraction": sum(n == workload.new_tokens for n in flat) / len(flat),
               "floor_s": floors, "floor_median_s": statistics.median(floors),
               "x_floor": statistics.median(s / f for s, f in zip(times, floors)),
               "floor_shared_median_s": statistics.median(shared),
               "x_floor_shared": statistics.median(s / f for s, f in zip(times, shared))}
        save(row)  # on disk once measured: a run stopped at its time limit keeps it
        print("ROW " + json.dumps({k: row[k] for k in ("engine", "shape", "workload", "seeding", "refill",
                                                       "generate_median_s", "tokens_per_s", "x_floor")}),
              flush=True)
    if args.engine == "vllm":
        engine.close()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(rows: list[dict]) -> str:
    nan = float("nan")  # rows measured before the shared floor was recorded
    lines = ["| engine | shape | workload | seeding | rows at a time | refill | generate s | tokens/s | "
             "length median / p90 / at limit | decode steps | rows x steps | floor s | x floor | shared floor s | "
             "x shared |",
             "|---|---|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        work = r.get("decoder_work") or [{}]
        steps, row_steps = (statistics.median(w.get(k, 0) for w in work) for k in ("decode_steps", "row_steps"))
        batch = r.get("max_batch_size")
        lines.append(f"| {r['engine']} | {r['shape']} | {r['workload']} | {r['seeding']} | "
                     f"{'all' if batch is None else batch or 'auto'} | {r.get('refill', '-')} | "
                     f"{r['generate_median_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['length_median']} / "
                     f"{r['length_p90']} / {100 * r['at_limit_fraction']:.1f}% | {steps:,.0f} | {row_steps:,.0f} | "
                     f"{r['floor_median_s']:.2f} | {r['x_floor']:.2f} | "
                     f"{r.get('floor_shared_median_s', nan):.2f} | {r.get('x_floor_shared', nan):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "winnow"], required=True)
    parser.add_argument("--shapes", default="0.5b,1.5b,7b")
    parser.add_argument("--workloads", default="fixed,longtail")
    parser.add_argument("--seeding", default="per-prompt,none", help="vLLM only: per-prompt and/or none")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vllm-memory", type=float, default=0.5)
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="winnow only: the engine's max_batch_size (default: the whole rollout; 0: auto)")
    parser.add_argument("--refill", choices=["on", "off", "both"], default="on",
                        help="winnow only: refill finished rows' slots (the default), chunks, or both")
    parser.add_argument("--max-autotune-gemm", action="store_true",
                        help="winnow only: inductor picks each compiled matmul's kernel by timing its candidates "
                             "(torch._inductor.config.max_autotune_gemm) instead of taking cuBLAS's")
    parser.add_argument("--cpu", action="store_true", help="smoke test: the tiny shape on CPU")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.max_autotune_gemm:
        from torch._inductor import config as inductor_config
        inductor_config.max_autotune_gemm = True
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)
        args.shapes = "tiny"
    ceilings = common.measure_ceilings(device)
    rows = []

    def save(row: dict) -> None:
        rows.append(row)
        result = {**common.environment(device), "ceilings": ceilings, "stop_fraction": STOP_FRACTION,
                  "max_autotune_gemm": args.max_autotune_gemm, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2))
        Path(args.out).with_suffix(".md").write_text(markdown(rows))

    for shape in args.shapes.split(","):
        if shape != "tiny" and shape not in SHAPES and shape != "0.5b":
            parser.error(f"unknown shape {shape!r}: choose from 0.5b, {', '.join(SHAPES)}")
        torch._dynamo.reset()  # each shape compiles from scratch, as a run of that model alone would
        run_shape(args, shape, device, ceilings, save)
    print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
